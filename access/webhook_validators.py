"""What a webhook endpoint's URL must be: something urllib can POST to, exactly as typed."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

from access.validators import describe_character, is_invisible

WEBHOOK_SCHEMES = ("http", "https")

CONTROL_CHARACTER = "The URL contains a space, control or invisible character ({char}); remove it."
NOT_ASCII = (
    "The URL contains {char}, which is not ASCII: percent-encode it in the path, and write an "
    "international domain name in its xn-- form."
)
WRONG_SCHEME = "Use an http:// or https:// URL: webhooks are sent as HTTP POST requests."
CREDENTIALS = (
    "Leave user name and password out of the URL; receivers authenticate the portal by the "
    "X-Portal-Signature header."
)


def validate_webhook_url(value: str) -> None:
    # http.client refuses (or, worse, sends on) characters outside printable ASCII; say
    # which one here instead of failing at every delivery.
    for char in value:
        if char == " " or is_invisible(char):
            raise ValidationError(
                CONTROL_CHARACTER.format(char=describe_character(char)), code="control_character"
            )
        if not char.isascii():
            raise ValidationError(NOT_ASCII.format(char=describe_character(char)), code="not_ascii")
    parts = urlsplit(value)
    if parts.scheme.lower() not in WEBHOOK_SCHEMES:
        raise ValidationError(WRONG_SCHEME, code="scheme")
    if "@" in parts.netloc:
        raise ValidationError(CREDENTIALS, code="credentials")
