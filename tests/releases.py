"""Release files with real bytes in local storage, for tests that download over the API."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from weights.models import Artifact, Release
from weights.storage import get_storage, reset_storage


@pytest.fixture
def local_weights(settings, tmp_path) -> Path:
    settings.WEIGHTS_STORAGE = "local"
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "store"
    reset_storage()
    yield tmp_path
    reset_storage()


def stored_file(
    release: Release,
    path: str,
    data: bytes,
    *,
    variant: str = Artifact.Variant.ORIGINAL,
    scratch: Path,
) -> Artifact:
    """Put `data` in storage and record it as the file `path` of `release`."""
    sha256 = hashlib.sha256(data).hexdigest()
    source = scratch / f"source-{sha256}"
    source.write_bytes(data)
    key = f"sha256/{sha256[:2]}/{sha256}"
    get_storage().put(key, source, size=len(data))
    return Artifact.objects.create(
        release=release,
        variant=variant,
        path=path,
        size=len(data),
        sha256=sha256,
        md5=hashlib.md5(data).hexdigest(),
        storage_key=key,
    )
