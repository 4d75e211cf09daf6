"""Publishing a release directory: hash, verify checklists, upload, record artifacts.

Storage keys are content-addressed (`sha256/<2 hex>/<sha256>`), so a file shared
by several releases (tokenizer.model) is stored once and a re-run uploads nothing.
Artifacts are immutable: a path already published with other content is refused.

After Meta's original files, a release whose directory holds one loadable checkpoint also
gets its Hugging Face transformers variant: converted into a temporary directory, verified
(`weights.services.transformers_variant`) and published as `variant="transformers"`. A
release without one is published as it is, with the reason in `PublishResult.transformers`.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import transaction
from django.utils import timezone

from weights.checksums import CHECKLIST_NAMES, ChecklistError, file_digests, parse_checklist
from weights.models import Artifact, Release
from weights.paths import artifact_path_ok
from weights.services.revisions import release_revision_refresh
from weights.services.transformers_variant import (
    NotConvertible,
    VerificationError,
    convert_verified,
    find_checkpoint,
)
from weights.storage import get_storage

logger = logging.getLogger(__name__)

NOT_A_DIRECTORY = "{directory} is not a directory"
BAD_WORK_DIR = "work directory {directory} for the transformers variant is not a directory"
EMPTY_DIRECTORY = "{directory} contains no files to publish"
UNSERVABLE_PATH = (
    "{path!r} cannot be published: download links cannot serve a path with a backslash, "
    "a control character or an empty, '.' or '..' segment; rename it"
)
BAD_SLUG = "{slug!r} is not a valid slug (letters, digits, hyphens and underscores)"
CHECKLIST_MALFORMED = "{checklist} is malformed: {error}"
CHECKLIST_BAD_NAME = "{checklist} lists {name!r}, which is outside its directory"
CHECKLIST_MISSING = "{checklist} lists {path}, which is not in the directory"
CHECKLIST_MISMATCH = "{checklist}: MD5 of {path} is {actual}, but the checklist says {expected}"
NO_VARIANT = "No transformers variant: {reason}"
VARIANT_ALREADY = "Transformers variant already published ({n} files)."
VARIANT_PUBLISHED = (
    "Transformers variant: {added} files added, {skipped} already published, "
    "{mib:.1f} MiB uploaded; verified config.json, {tensors} tensor headers, "
    "tokenizer.json ({check})."
)
ARTIFACT_CHANGED = (
    "{path} is already published in {slug} with SHA-256 {published}, but the file now has "
    "SHA-256 {actual}; published artifacts are immutable (publish a new release instead)"
)


class PublishError(Exception):
    """The directory cannot be published as it is; nothing was uploaded or recorded."""


class ProgressBar(Protocol):
    def update(self, n: int, /) -> object: ...

    def close(self) -> object: ...


# Called with (phase, relative path, size) where phase is "hash", "upload" or "convert" (the
# checkpoint directory into the transformers variant, counted in bytes of tensors written).
ProgressFactory = Callable[[str, str, int], ProgressBar | None]


@dataclass(frozen=True)
class SourceFile:
    path: str
    source: Path
    size: int
    sha256: str
    md5: str

    @property
    def storage_key(self) -> str:
        return storage_key_for(self.sha256)


@dataclass
class PublishResult:
    release: Release
    created: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    release_created: bool = False
    # The transformers variant's outcome; None where it was not asked for.
    transformers: VariantOutcome | None = None


@dataclass
class VariantOutcome:
    message: str  # one line for the operator: what was published, or why nothing was
    published: PublishResult | None = None


def storage_key_for(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256}"


def release_publish(
    *,
    directory: Path,
    slug: str,
    name: str | None = None,
    family: str = "llama",
    parameter_count: int | None = None,
    description: str = "",
    progress: ProgressFactory | None = None,
    variant: str = Artifact.Variant.ORIGINAL,
    transformers: bool = True,
    work_dir: Path | None = None,
) -> PublishResult:
    """Publish every file under `directory` as release `slug`, in `variant` (Meta's original
    layout unless told otherwise).

    An existing release keeps its name and metadata; only new files are added, and the
    release's revision is recomputed. With `transformers`, publishing the original layout
    also publishes the transformers variant when the directory holds a loadable checkpoint,
    converted under `work_dir` (default: the system's temporary directory).
    """
    try:
        validate_slug(slug)
    except ValidationError as exc:
        raise PublishError(BAD_SLUG.format(slug=slug)) from exc
    directory = Path(directory)
    if not directory.is_dir():
        raise PublishError(NOT_A_DIRECTORY.format(directory=directory))
    if transformers and work_dir is not None and not Path(work_dir).is_dir():
        raise PublishError(BAD_WORK_DIR.format(directory=work_dir))
    paths = list_release_files(directory)
    if not paths:
        raise PublishError(EMPTY_DIRECTORY.format(directory=directory))
    for path in paths:
        if not artifact_path_ok(path):
            raise PublishError(UNSERVABLE_PATH.format(path=path))

    files = {path: _hash(directory, path, progress) for path in paths}
    verify_checklists(files)
    published = dict(
        Artifact.objects.filter(release__slug=slug, variant=variant).values_list("path", "sha256")
    )
    _refuse_changes(files.values(), published, slug)
    new = [f for f in files.values() if f.path not in published]

    storage = get_storage()
    uploaded = 0
    for f in new:
        bar = progress("upload", f.path, f.size) if progress else None
        try:
            if storage.put(f.storage_key, f.source, size=f.size, progress=bar and bar.update):
                uploaded += f.size
        finally:
            if bar is not None:
                bar.close()

    with transaction.atomic():
        release, release_created = Release.objects.select_for_update().get_or_create(
            slug=slug,
            defaults={
                "name": name or slug,
                "family": family,
                "parameter_count": parameter_count,
                "description": description,
            },
        )
        # Another publisher may have won the race since we looked.
        published = dict(release.artifacts.filter(variant=variant).values_list("path", "sha256"))
        _refuse_changes(files.values(), published, slug)
        created = [f for f in files.values() if f.path not in published]
        Artifact.objects.bulk_create(
            Artifact(
                release=release,
                variant=variant,
                path=f.path,
                size=f.size,
                sha256=f.sha256,
                md5=f.md5,
                storage_key=f.storage_key,
            )
            for f in created
        )
        if release.published_at is None:
            release.published_at = timezone.now()
            release.save(update_fields=["published_at"])
        release_revision_refresh(release)

    result = PublishResult(
        release=release,
        created=[f.path for f in created],
        skipped=[p for p in paths if p in published],
        bytes_uploaded=uploaded,
        release_created=release_created,
    )
    if transformers and variant == Artifact.Variant.ORIGINAL:
        result.transformers = _publish_transformers(directory, paths, result, progress, work_dir)
    return result


def _publish_transformers(
    directory: Path,
    paths: list[str],
    original: PublishResult,
    progress: ProgressFactory | None,
    work_dir: Path | None,
) -> VariantOutcome:
    """Convert, verify and publish the transformers variant; never undoes the original."""
    release = original.release
    existing = release.artifacts.filter(variant=Artifact.Variant.TRANSFORMERS).count()
    if existing and not original.created:
        # Nothing new in the original: the conversion would give the same bytes again.
        return VariantOutcome(VARIANT_ALREADY.format(n=existing))
    try:
        source = find_checkpoint(directory, paths)
        with tempfile.TemporaryDirectory(prefix="transformers-", dir=work_dir) as tmp:
            bar = (
                progress("convert", source.relative or ".", source.shard_bytes)
                if progress
                else None
            )
            try:
                verified = convert_verified(source, Path(tmp), progress=bar and bar.update)
            finally:
                if bar is not None:
                    bar.close()
            published = release_publish(
                directory=Path(tmp),
                slug=release.slug,
                progress=progress,
                variant=Artifact.Variant.TRANSFORMERS,
                transformers=False,
            )
    except (NotConvertible, PublishError) as exc:
        if isinstance(exc, VerificationError | PublishError):
            logger.warning("release %s: transformers variant not published: %s", release.slug, exc)
        return VariantOutcome(NO_VARIANT.format(reason=exc))
    release.refresh_from_db(fields=["revision"])
    message = VARIANT_PUBLISHED.format(
        added=len(published.created),
        skipped=len(published.skipped),
        mib=published.bytes_uploaded / 2**20,
        tensors=verified.tensors,
        check=verified.tokenizer_check,
    )
    return VariantOutcome(message, published=published)


def list_release_files(directory: Path) -> list[str]:
    """Relative POSIX paths of the files to publish: no hidden files, no `.part` leftovers."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(directory).as_posix()
        for filename in sorted(filenames):
            if filename.startswith(".") or filename.endswith(".part"):
                continue
            if not Path(dirpath, filename).is_file():
                continue
            found.append(filename if rel_dir == "." else f"{rel_dir}/{filename}")
    return found


def verify_checklists(files: dict[str, SourceFile]) -> None:
    """Every checklist must match the files it lists, relative to its own directory."""
    for path, f in files.items():
        if posixpath.basename(path) not in CHECKLIST_NAMES:
            continue
        try:
            entries = parse_checklist(f.source.read_text(encoding="utf-8"))
        except (ChecklistError, UnicodeDecodeError) as exc:
            raise PublishError(CHECKLIST_MALFORMED.format(checklist=path, error=exc)) from exc
        base = posixpath.dirname(path)
        for listed, expected in entries.items():
            target = posixpath.normpath(posixpath.join(base, listed))
            if listed.startswith("/") or target.startswith("../") or target == "..":
                raise PublishError(CHECKLIST_BAD_NAME.format(checklist=path, name=listed))
            if target not in files:
                raise PublishError(CHECKLIST_MISSING.format(checklist=path, path=target))
            actual = files[target].md5
            if actual != expected:
                raise PublishError(
                    CHECKLIST_MISMATCH.format(
                        checklist=path, path=target, actual=actual, expected=expected
                    )
                )


def _hash(directory: Path, path: str, progress: ProgressFactory | None) -> SourceFile:
    source = directory / path
    bar = progress("hash", path, source.stat().st_size) if progress else None
    try:
        sha256, md5, size = file_digests(source, progress=bar and bar.update)
    finally:
        if bar is not None:
            bar.close()
    return SourceFile(path=path, source=source, size=size, sha256=sha256, md5=md5)


def _refuse_changes(files: Iterable[SourceFile], published: dict[str, str], slug: str) -> None:
    # Name the changed data file rather than the checklist that changed along with it.
    for f in sorted(files, key=lambda f: (posixpath.basename(f.path) in CHECKLIST_NAMES, f.path)):
        if f.path in published and published[f.path] != f.sha256:
            raise PublishError(
                ARTIFACT_CHANGED.format(
                    path=f.path, slug=slug, published=published[f.path], actual=f.sha256
                )
            )
