"""Fingerprinted releases: marking a release, and each grantee's own copy of its files.

A fingerprinted release serves every grantee weights that differ from the published ones
in a key-selected set of positions by one unit in the last place (weights.fingerprint).
Which files differ: the weight files (``consolidated.NN.pth``, ``*.safetensors``) and,
because it lists their MD5s, ``checklist.chk``. Everything else is served as published.

The rules, in one place for the admin, ``publish_release`` and the API:

- a release is marked before its first grant, never after (earlier grantees would hold
  copies that name nobody), and never unmarked (the copies already out stay traceable);
- a grant's link is emailed only once its copies' checksums are ready
  (``copies_ready``), so ``md5sum -c``, the CLI and the Hub client check the grantee's own
  bytes from the first download on;
- with WEIGHTS_FINGERPRINT_MATERIALISE each copy is also written to storage under a key of
  its grant's (``copy_key``) and then served like any stored file (a presigned redirect on
  S3); without it the portal computes the bytes per request, which needs the originals on
  this machine, so a release in S3 cannot be marked.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from access.models import Grant
from weights.fingerprint.keys import new_release_key, recipient_code
from weights.models import Artifact, RecipientCopy, Release
from weights.services.original_cache import cached_original
from weights.services.stored_copies import Hashing, copy_key
from weights.storage import get_storage

if TYPE_CHECKING:  # the layouts read checkpoints with torch's rules: loaded on first use,
    # so a web process that serves no fingerprinted file never imports torch (DESIGN 6)
    from weights.fingerprint.layout import FileLayout

CHUNK = 4 << 20
SHARD = re.compile(r"^consolidated\.\d+\.pth$")
HF_CONFIG = "config.json"

CHECKLIST = "checklist.chk"
WEIGHT_SUFFIXES = (".pth", ".safetensors")

ALREADY_GRANTED = (
    "{release} already has {n} grant(s): mark a release fingerprinted before its first "
    "grant, so that every copy that leaves names its recipient."
)


class FingerprintRefused(Exception):
    pass


def release_mark_fingerprinted(*, release: Release) -> Release:
    """Mark ``release`` fingerprinted and give it its secret; idempotent."""
    with transaction.atomic():
        release = Release.objects.select_for_update().get(pk=release.pk)
        if release.fingerprinted:
            return release
        granted = Grant.objects.filter(release=release).count()
        if granted:
            raise FingerprintRefused(ALREADY_GRANTED.format(release=release, n=granted))
        check_release(release)
        release.fingerprinted = True
        release.fingerprint_key = new_release_key()
        release.save(update_fields=["fingerprinted", "fingerprint_key"])
    return release


def differs_per_recipient(artifact: Artifact) -> bool:
    """Whether this file's bytes are the grantee's own in a fingerprinted release."""
    name = posixpath.basename(artifact.path)
    return name == CHECKLIST or name.endswith(WEIGHT_SUFFIXES)


def differs_in(release: Release, artifact: Artifact) -> bool:
    """Whether each grantee of ``release`` receives bytes of ``artifact`` of their own."""
    return release.fingerprinted and differs_per_recipient(artifact)


def is_own_copy(grant: Grant, artifact: Artifact) -> bool:
    """Whether this grantee is served their own bytes of ``artifact``."""
    return differs_in(grant.release, artifact)


def grant_code(grant: Grant) -> bytes:
    key = grant.release.fingerprint_key
    if not grant.release.fingerprinted or not key:
        raise FingerprintRefused(f"{grant.release} is not fingerprinted")
    return recipient_code(bytes(key), grant.pk)


def copies_ready(grant: Grant) -> bool:
    """True when the grantee's files can be served: not fingerprinted, or all prepared."""
    if not grant.release.fingerprinted:
        return True
    needed = [a.pk for a in grant.release.artifacts.all() if differs_per_recipient(a)]
    ready = RecipientCopy.objects.filter(
        grant=grant, artifact_id__in=needed, state=RecipientCopy.State.READY
    ).count()
    return ready == len(needed)


def copies_pending(grant_id: int) -> bool:
    """Whether an active grant's link still waits for files of its own copy."""
    grant = Grant.objects.select_related("release").filter(pk=grant_id).first()
    return grant is not None and grant.revoked_at is None and not copies_ready(grant)


PREPARING_KEY = "weights:fingerprint:preparing:{grant_id}"


@contextlib.contextmanager
def preparing(grant_id: int) -> Iterator[bool]:
    """True for the one run that prepares this grant's copy now; False when another holds
    it. Held for WEIGHTS_FINGERPRINT_LOCK_S and renewed after each file (``copies_prepare``),
    so a run that was killed lets the next one in within that time."""
    key = PREPARING_KEY.format(grant_id=grant_id)
    mine = cache.add(key, 1, settings.WEIGHTS_FINGERPRINT_LOCK_S)
    try:
        yield bool(mine)
    finally:
        if mine:
            cache.delete(key)


def _renew(grant_id: int) -> None:
    cache.touch(PREPARING_KEY.format(grant_id=grant_id), settings.WEIGHTS_FINGERPRINT_LOCK_S)


def served_checksums(
    grant: Grant, artifacts: list[Artifact]
) -> list[tuple[Artifact, tuple[str, str]]]:
    """Each file with the (SHA-256, MD5) its grantee receives: their own copy's where the
    file differs per recipient (empty while it is being prepared), else the published."""
    copies = recipient_checksums(grant)
    out = []
    for artifact in artifacts:
        if is_own_copy(grant, artifact):
            copy = copies.get(artifact.pk)
            out.append((artifact, (copy.sha256, copy.md5) if copy else ("", "")))
        else:
            out.append((artifact, (artifact.sha256, artifact.md5)))
    return out


def copies_state(grant: Grant) -> str:
    """The grant's fingerprint, in words, for reviewers (the admin's grant page)."""
    if not grant.release.fingerprinted:
        return "Not fingerprinted: this release is served as published."
    needed = [a.pk for a in grant.release.artifacts.all() if differs_per_recipient(a)]
    copies = {c.artifact_id: c for c in RecipientCopy.objects.filter(grant=grant)}
    ready = sum(1 for pk in needed if pk in copies and copies[pk].state == "ready")
    failed = [c for c in copies.values() if c.state == RecipientCopy.State.FAILED]
    if ready == len(needed):
        return f"Own copy ready: {ready} files differ from the published ones, traceable to this grant."
    if failed:
        return f"Preparing failed ({ready} of {len(needed)} files ready): {failed[0].error}"
    return f"Preparing the grantee's copy: {ready} of {len(needed)} files ready."


def recipient_checksums(grant: Grant) -> dict[int, RecipientCopy]:
    """The grantee's ready copies by artifact id (empty when not fingerprinted)."""
    if not grant.release.fingerprinted:
        return {}
    return {
        copy.artifact_id: copy
        for copy in RecipientCopy.objects.filter(grant=grant, state=RecipientCopy.State.READY)
    }


# --- a grantee's bytes ---------------------------------------------------------------------

NOT_LOCAL = (
    "{release} is stored in S3, where the portal cannot compute each grantee's copy per "
    "request: set WEIGHTS_FINGERPRINT_MATERIALISE=1 to write every grantee's copy into the "
    "bucket (one full copy of the release per grant), or use WEIGHTS_STORAGE=local; see "
    'docs/fingerprinting.md, "With S3 storage"'
)
PREPARING = (
    "Your own copy of {release} is being prepared: its checksums are computed before the "
    "files are served. Try again in a minute."
)


def original_path(artifact: Artifact) -> Path:
    """The published file on this machine's disk, where fingerprinted bytes are computed
    (and leaks traced) from: the stored file itself, or its verified download (S3)."""
    path = get_storage().local_path(artifact.storage_key)
    return cached_original(artifact) if path is None else path


def materialises() -> bool:
    """Whether each grantee's copy is written to storage, then served as a stored file."""
    return settings.WEIGHTS_FINGERPRINT_MATERIALISE


def _check_servable(artifact: Artifact) -> None:
    """A copy is computed per request only from local storage; S3 needs it written out."""
    if not materialises() and get_storage().local_path(artifact.storage_key) is None:
        raise FingerprintRefused(NOT_LOCAL.format(release=artifact.release))


@functools.lru_cache(maxsize=256)
def _layout(artifact_id: int) -> FileLayout:
    """Where each tensor lies in this file and where it sits in the merged model; read
    from the stored files once per process (they never change under their key)."""
    from weights.fingerprint.layout import meta_layout, read_torch_tensors, safetensors_layout

    artifact = Artifact.objects.select_related("release").get(pk=artifact_id)
    name = posixpath.basename(artifact.path)
    siblings = artifact.release.artifacts.filter(variant=artifact.variant)
    if name.endswith(".pth"):
        folder = posixpath.dirname(artifact.path)
        shards = sorted(
            (
                a
                for a in siblings
                if posixpath.dirname(a.path) == folder and SHARD.match(posixpath.basename(a.path))
            ),
            key=lambda a: a.path,
        )
        paths = [original_path(a) for a in shards]
        shapes = [{t.name: t.shape for t in read_torch_tensors(p)[1]} for p in paths]
        index = [a.pk for a in shards].index(artifact.pk)
        return meta_layout(
            original_path(artifact), shard_index=index, n_shards=len(shards), shard_shapes=shapes
        )
    config = next((a for a in siblings if a.path == HF_CONFIG), None)
    if config is None:
        raise FingerprintRefused(f"{artifact}: no {HF_CONFIG} next to it")
    settings_json = json.loads(original_path(config).read_bytes())
    return safetensors_layout(original_path(artifact), config=settings_json)


def check_release(release: Release) -> None:
    """Every weight file can carry a fingerprint (stored locally, bf16/fp16): refuse early,
    at marking time, rather than serve copies that name nobody."""
    from weights.fingerprint.embed import check_embeddable
    from weights.fingerprint.layout import LayoutError

    differing = [a for a in release.artifacts.all() if differs_per_recipient(a)]
    for artifact in differing:  # before any download: S3 without the option is refused
        _check_servable(artifact)
    for artifact in differing:
        if not _is_checklist(artifact):
            try:
                check_embeddable(_layout(artifact.pk))
            except LayoutError as exc:
                raise FingerprintRefused(str(exc)) from exc


def _is_checklist(artifact: Artifact) -> bool:
    return posixpath.basename(artifact.path) == CHECKLIST


class CopyHandle:
    """The grantee's bytes of one file, as a read-only, seekable binary file."""

    def __init__(self, path: Path, layout: FileLayout, release_key: bytes, code: bytes) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._layout, self._key, self._code = layout, release_key, code
        self._pos = 0

    def _read_at(self, a: int, b: int) -> bytes:
        return os.pread(self._fd, b - a, a)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = offset if whence == os.SEEK_SET else self._pos + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._layout.size if n < 0 else min(self._layout.size, self._pos + n)
        if end <= self._pos:
            return b""
        from weights.fingerprint.embed import fingerprint_range

        start, self._pos = self._pos, end
        original = self._read_at(start, end)
        return fingerprint_range(
            self._layout, self._key, self._code, start, end, original, read_at=self._read_at
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def checklist_bytes(grant: Grant, artifact: Artifact) -> bytes:
    """The published checklist with each listed weight file's MD5 replaced by the grantee's."""
    folder = posixpath.dirname(artifact.path)
    copies = recipient_checksums(grant)
    by_name = {
        posixpath.relpath(a.path, folder or "."): copies[a.pk].md5
        for a in grant.release.artifacts.filter(variant=artifact.variant)
        if a.pk in copies and not _is_checklist(a)
    }
    lines = []
    for line in original_path(artifact).read_text().splitlines(keepends=True):
        md5, sep, name = line.partition("  ")
        own = by_name.get(name.rstrip("\r\n").removeprefix("./"))
        lines.append(f"{own}{sep}{name}" if own and sep else line)
    return "".join(lines).encode()


def open_copy(grant: Grant, artifact: Artifact) -> BinaryIO:
    """The grantee's bytes of ``artifact`` (a file that differs per recipient)."""
    if _is_checklist(artifact):
        return io.BytesIO(checklist_bytes(grant, artifact))
    release = grant.release
    return CopyHandle(  # type: ignore[return-value]
        original_path(artifact),
        _layout(artifact.pk),
        bytes(release.fingerprint_key),
        grant_code(grant),
    )


def served_copy(grant: Grant, artifact: Artifact) -> RecipientCopy | None:
    """The grantee's ready copy of a file that differs per recipient; None while preparing."""
    return RecipientCopy.objects.filter(
        grant_id=grant.pk, artifact_id=artifact.pk, state=RecipientCopy.State.READY
    ).first()


def _prepare(grant: Grant, artifact: Artifact) -> tuple[str, str, str]:
    """The grantee's (SHA-256, MD5, storage key) of one file: checksums only, or the copy
    written to storage as it is hashed."""
    _check_servable(artifact)
    handle = open_copy(grant, artifact)
    hashing = Hashing(handle)
    try:
        if not materialises():
            while hashing.read(CHUNK):
                pass
            return (*hashing.digests(), "")
        key = copy_key(grant, artifact)
        get_storage().put_stream(key, hashing, size=artifact.size)
        return (*hashing.digests(), key)
    finally:
        handle.close()


def _done(copy: RecipientCopy | None) -> bool:
    """A ready copy needs nothing more, unless copies are written out and this one is not
    (or its object is gone): then it is written now."""
    if copy is None or copy.state != RecipientCopy.State.READY:
        return False
    if not materialises():
        return True
    return bool(copy.storage_key) and get_storage().size_of(copy.storage_key) is not None


def copies_prepare(*, grant_id: int) -> int:
    """Compute the grantee's checksums of every file that differs per recipient, and with
    WEIGHTS_FINGERPRINT_MATERIALISE write each copy to storage in the same pass.

    Idempotent and restartable: each file's row commits on its own, a ready row is never
    recomputed, so a worker killed halfway leaves the rest to the next run. The checklist
    comes last, from the weight files' MD5s. A failure is written on the file's row (the
    grant's admin page shows it) and raised, so the task retries. Returns how many files
    were prepared now."""
    grant = Grant.objects.select_related("release").get(pk=grant_id)
    if not grant.release.fingerprinted or grant.revoked_at is not None:
        return 0
    copies = {c.artifact_id: c for c in RecipientCopy.objects.filter(grant=grant)}
    todo = [a for a in grant.release.artifacts.all() if differs_per_recipient(a)]
    todo.sort(key=_is_checklist)  # weights first: the checklist lists their MD5s
    prepared = 0
    for artifact in todo:
        if _done(copies.get(artifact.pk)):
            continue
        try:
            sha256, md5, key = _prepare(grant, artifact)
        except Exception as exc:
            failed = {"state": RecipientCopy.State.FAILED, "error": f"{exc}"[:2000]}
            if materialises():  # an object may be left under it: deleted on revocation
                failed["storage_key"] = copy_key(grant, artifact)
            RecipientCopy.objects.update_or_create(grant=grant, artifact=artifact, defaults=failed)
            raise
        RecipientCopy.objects.update_or_create(
            grant=grant,
            artifact=artifact,
            defaults={
                "state": RecipientCopy.State.READY,
                "sha256": sha256,
                "md5": md5,
                "storage_key": key,
                "error": "",
                "prepared_at": timezone.now(),
            },
        )
        prepared += 1
        _renew(grant.pk)
    return prepared
