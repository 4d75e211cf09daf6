"""Keep bearer secrets out of logs and stdout: every URL that carries one is masked.

The secrets are download-link tokens (``/d/<token>/...``), allauth password-reset keys
(``/accounts/password/reset/key/<uidb36>-<key>/``) and email-confirmation keys
(``/accounts/confirm-email/<key>/``).

A log line holds the client's own spelling of a URL, and the server does not route
that spelling as written: gunicorn percent-decodes the path once (``%2f`` included) into
``PATH_INFO`` before Django resolves it, and nginx and browsers also resolve dot
segments. So ``/%64/<token>/``, ``/d%2f<token>/`` and ``/d/x/../<token>/`` all reach a
link. Each URL in a line is therefore decoded (repeatedly, for stacked encodings) and
dot-resolved before the secrets are looked for; a URL that carries one is logged in
that routed, masked form, re-escaped so that decoding never lets a newline or a quote
into the line. As a catch-all, any 32+ character URL-safe run after a ``/d`` segment is
masked too, and in a URL that was not written plainly (escapes, dot segments), any run
that is not all hex: a link token in whatever position a client put it.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote, unquote

TOKEN_MASK = "<token>"
KEY_MASK = "<key>"

# A URL or path inside a log line or a mail: up to whitespace, a quote or an HTML bracket.
_URL = re.compile(r"[^\s\"'<>]*[/%\\][^\s\"'<>]*")
_SPLIT = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)?(?P<path>[^?#]*)(?P<tail>.*)$", re.S
)
_LINK = re.compile(r"/d/(?!\.\.?(?:[/?#]|$))[^/?#\s]+")
_RESET_KEY = re.compile(r"/password/reset/key/(?![0-9A-Za-z]+-set-password(?:[/?#]|$))[^?#\s]+")
_CONFIRM_KEY = re.compile(r"/confirm-email/[^?#\s]+")
# A `/d` segment, whatever follows it (`/`, `;`, a control character, the end).
_LINK_SEGMENT = re.compile(r"/d(?![A-Za-z0-9_.~-])")
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_-]{32,}")
_HEX = re.compile(r"[0-9A-Fa-f]+")
# What stays as it is when a masked URL is written back: printable ASCII but the quotes.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "\"'")
_MAX_DECODES = 4


# A personal API token (access.tokens: knox secret with the "lap_" prefix), wherever it is.
_API_TOKEN = re.compile(r"lap_[0-9a-fA-F]{16,}")


def redact(text: str) -> str:
    """`text` with every secret-carrying URL replaced by its routed, masked form."""
    if "lap_" in text:
        text = _API_TOKEN.sub("lap_" + TOKEN_MASK, text)
    if "/" not in text and "%" not in text and "\\" not in text:
        return text
    return _URL.sub(_redact_url, text)


def _redact_url(match: re.Match[str]) -> str:
    raw = match[0]
    decoded = _decode(raw)
    parts = _SPLIT.match(decoded)
    head, path, tail = parts["head"] or "", parts["path"], parts["tail"]
    routed = head + _resolve_dots(path) + tail
    # Masked both before and after resolving: `..` can hide a token or bring one forward.
    masked = _mask(head + _resolve_dots(_mask(path)) + tail)
    if routed != raw:
        # An unusual spelling may have moved a token anywhere (/d/x/../../<token>).
        masked = _TOKEN_LIKE.sub(_mask_unless_hex, masked)
    if masked == routed:
        return raw
    return quote(masked, safe=_SAFE)


def _mask_unless_hex(match: re.Match[str]) -> str:
    # A commit id or a digest (all hex) is not a link token, which is base64url.
    return match[0] if _HEX.fullmatch(match[0]) else TOKEN_MASK


def _decode(text: str) -> str:
    for _ in range(_MAX_DECODES):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    # Browsers and some clients read a backslash in a path as a slash.
    return text.replace("\\", "/")


def _resolve_dots(path: str) -> str:
    """RFC 3986 remove_dot_segments, as nginx and every browser apply it."""
    segments = path.split("/")
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if len(kept) > 1:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments[-1] in (".", ".."):
        kept.append("")
    return "/".join(kept)


def _mask(text: str) -> str:
    text = _LINK.sub(f"/d/{TOKEN_MASK}", text)
    text = _RESET_KEY.sub(f"/password/reset/key/{KEY_MASK}", text)
    text = _CONFIRM_KEY.sub(f"/confirm-email/{KEY_MASK}", text)
    after = _LINK_SEGMENT.search(text)
    if after:
        start = after.end()
        text = text[:start] + _TOKEN_LIKE.sub(TOKEN_MASK, text[start:])
    return text


class RedactTokensFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        # A traceback can quote a URL too (a resolver error, a request repr).
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
