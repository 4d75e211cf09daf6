from __future__ import annotations

import re

from django.conf import settings
from django.core.exceptions import ValidationError

_ORCID = re.compile(r"^\d{4}-\d{4}-\d{4}-\d{3}[\dX]$")


def validate_orcid(value: str) -> None:
    """ORCID iDs carry an ISO 7064 MOD 11-2 check digit; typos fail here, not in review."""
    if not _ORCID.match(value):
        raise ValidationError("Enter an ORCID iD as 0000-0002-1825-0097.")
    digits = value.replace("-", "")
    total = 0
    for char in digits[:-1]:
        total = (total + int(char)) * 2
    check = (12 - total % 11) % 11
    expected = "X" if check == 10 else str(check)
    if digits[-1] != expected:
        raise ValidationError(
            "This ORCID iD's check digit is wrong; copy it from your ORCID record."
        )


def validate_intended_use_length(value: str) -> None:
    limit = settings.PORTAL_INTENDED_USE_MAX_LENGTH
    if len(value) > limit:
        raise ValidationError(
            f"Keep the intended research use under {limit} characters (it has {len(value)})."
        )


def validate_scholar_url(value: str) -> None:
    if value and "scholar.google." not in value:
        raise ValidationError(
            "Enter a Google Scholar profile URL (scholar.google.com/citations?user=…)."
        )
