"""A published file's bytes on this machine, for storage that keeps them elsewhere (S3).

A fingerprinted copy is computed from the original with positioned reads, and the leak
tracer reads the originals too; both need a file on disk. Each original is downloaded once
into WEIGHTS_FINGERPRINT_CACHE under its storage key (content-addressed: a key never names
other bytes), checked against the SHA-256 published for it, and renamed into place only
then, so a file found there is a verified one. The directory may be emptied at any time:
what is missing is downloaded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from django.conf import settings

from weights.models import Artifact
from weights.storage import StorageError, get_storage, validate_key

CHUNK = 8 << 20

CORRUPT = (
    "{artifact}: the stored object read back as {size} bytes with SHA-256 {sha256}, "
    "published as {want_size} bytes with {want_sha256}"
)


def cache_path(artifact: Artifact) -> Path:
    return Path(settings.WEIGHTS_FINGERPRINT_CACHE) / validate_key(artifact.storage_key)


def cached_original(artifact: Artifact) -> Path:
    """The local copy of ``artifact``'s published bytes, downloaded first if need be."""
    path = cache_path(artifact)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size == artifact.size:
            return path  # only a verified download is ever renamed into place
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two processes may download the same file at once: each into its own temporary file,
    # and the same verified bytes replace one another.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        digest, size = hashlib.sha256(), 0
        with (
            os.fdopen(fd, "wb") as out,
            contextlib.closing(get_storage().open(artifact.storage_key)) as src,
        ):
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size != artifact.size or digest.hexdigest() != artifact.sha256:
            raise StorageError(
                CORRUPT.format(
                    artifact=artifact,
                    size=size,
                    sha256=digest.hexdigest(),
                    want_size=artifact.size,
                    want_sha256=artifact.sha256,
                )
            )
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return path
