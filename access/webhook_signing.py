"""Webhook signatures, Stripe-style: `X-Portal-Signature: t=<unix time>,v1=<hex HMAC>`.

The HMAC-SHA256 is keyed with the endpoint's secret and covers `f"{t}.{raw body}"`, so a
receiver can tell that the body came from the portal, unchanged, and recently (a replayed
request carries an old `t`). While a rotated secret is in its grace period the header
carries one `v1` per secret; a receiver accepts any that matches its own.

`verify` is stdlib-only on purpose: docs/webhooks.md prints its source for receivers to
copy, and a test fails if the two differ.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Portal-Signature"
EVENT_HEADER = "X-Portal-Event"
DELIVERY_HEADER = "X-Portal-Delivery"


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The hex HMAC-SHA256 of `f"{timestamp}.{body}"` under `secret`."""
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int, *, previous_secret: str = "") -> str:
    """The X-Portal-Signature value for `body` sent at `timestamp` (Unix seconds)."""
    parts = [f"t={timestamp}", f"v1={signature(secret, body, timestamp)}"]
    if previous_secret:
        parts.append(f"v1={signature(previous_secret, body, timestamp)}")
    return ",".join(parts)


def verify(secret: str, body: bytes, header: str, tolerance: int = 300) -> bool:
    """True if `header` (X-Portal-Signature) signs the raw request `body` with `secret`
    and its timestamp is within `tolerance` seconds of now."""
    timestamp = ""
    candidates = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1":
            candidates.append(value)
    if not (timestamp.isascii() and timestamp.isdigit()) or not candidates:
        return False
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    message = timestamp.encode("ascii") + b"." + body
    expected = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()
    return any(c.isascii() and hmac.compare_digest(expected, c) for c in candidates)
