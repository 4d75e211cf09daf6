"""Bearer tokens for download links: 192 random bits, stored only as SHA-256."""

from __future__ import annotations

import hashlib
import re
import secrets

TOKEN_BYTES = 24
_TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{32}$")


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def looks_like_token(token: str) -> bool:
    return bool(_TOKEN_SHAPE.match(token))
