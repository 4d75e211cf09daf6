"""Grantees' fingerprinted copies written to storage (WEIGHTS_FINGERPRINT_MATERIALISE):
where each one goes, the checksums taken as it is written, and its deletion once the
grant is revoked. What the bytes are is weights.services.fingerprinting's."""

from __future__ import annotations

import hashlib
from typing import BinaryIO

from access.models import Grant
from weights.models import Artifact, RecipientCopy
from weights.storage import get_storage, validate_key

COPY_PREFIX = "fingerprinted"


def copy_key(grant: Grant, artifact: Artifact) -> str:
    """Where the grantee's copy of ``artifact`` is written: one key per grant and file."""
    return validate_key(f"{COPY_PREFIX}/{grant.pk}/{artifact.repo_path}")


class Hashing:
    """Reads through ``handle``, hashing what passes: the checksums come from the one read
    that also writes the bytes out."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.sha256, self.md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)

    def read(self, n: int = -1) -> bytes:
        chunk = self._handle.read(n)
        self.sha256.update(chunk)
        self.md5.update(chunk)
        return chunk

    def digests(self) -> tuple[str, str]:
        return self.sha256.hexdigest(), self.md5.hexdigest()


def revoked_copies_delete() -> int:
    """Delete the copies written to storage for grants since revoked; returns how many.

    The rows are the outbox: the revocation has committed, so a row of a revoked grant that
    still names a key is work left, and the key is cleared only once its object is deleted
    (deleting is idempotent: two sweeps at once do no harm). The checksums stay, as the
    record of what the grantee was sent."""
    pending = RecipientCopy.objects.filter(grant__revoked_at__isnull=False).exclude(storage_key="")
    storage, deleted = get_storage(), 0
    for pk, key in list(pending.values_list("pk", "storage_key")):
        if key.startswith(f"{COPY_PREFIX}/"):  # never a published file's key
            storage.delete(key)
        deleted += RecipientCopy.objects.filter(pk=pk, storage_key=key).update(storage_key="")
    return deleted
