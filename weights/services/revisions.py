"""A release's revision: one content hash of all its files, the Hub protocol's commit.

Hugging Face clients cache files under the commit a repository reports and take a 40-hex
revision as immutable, so the revision must change whenever any file is added or changes,
and stay the same otherwise: a SHA-1 over every (variant, path, SHA-256), sorted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from weights.models import Release


def revision_of(files: Iterable[tuple[str, str, str]]) -> str:
    """The revision of a release holding these (variant, path, sha256) files."""
    digest = hashlib.sha1(usedforsecurity=False)
    for variant, path, sha256 in sorted(files):
        digest.update(f"{variant}\0{path}\0{sha256}\n".encode())
    return digest.hexdigest()


def release_revision_refresh(release: Release) -> str:
    """Recompute and store `release.revision` from its files; returns it."""
    revision = revision_of(release.artifacts.values_list("variant", "path", "sha256"))
    if release.revision != revision:
        Release.objects.filter(pk=release.pk).update(revision=revision)
        release.revision = revision
    return revision
