from __future__ import annotations

import re
import unicodedata

from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils.deconstruct import deconstructible

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


INVISIBLE_CHARACTER = "{label} contains an invisible or control character ({char}); remove it."

# Categories that never belong in what a person types: controls (Cc), format characters
# such as bidi overrides and zero-width joiners (Cf), lone surrogates from JSON escapes
# (Cs) and the Unicode line and paragraph separators (Zl, Zp).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Letters that render as nothing and are used to fake blank or look-alike names.
_INVISIBLE_LETTERS = frozenset({"\u115f", "\u1160", "\u3164", "\uffa0"})
_MULTILINE_ALLOWED = frozenset("\n\r\t")
# Zero-width (non-)joiners are part of how Persian, Urdu and Indic names are spelled; they
# are allowed between two letters or marks (the joining context) and refused elsewhere.
_JOINERS = frozenset({"\u200c", "\u200d"})
_CONTROL_NAMES = {
    0x00: "NULL",
    0x09: "CHARACTER TABULATION",
    0x0A: "LINE FEED",
    0x0B: "LINE TABULATION",
    0x0C: "FORM FEED",
    0x0D: "CARRIAGE RETURN",
    0x1B: "ESCAPE",
    0x7F: "DELETE",
    0x85: "NEXT LINE",
}


def is_invisible(char: str) -> bool:
    return unicodedata.category(char) in _REFUSED_CATEGORIES or char in _INVISIBLE_LETTERS


def _joins_letters(value: str, index: int) -> bool:
    def letter_or_mark(i: int) -> bool:
        return 0 <= i < len(value) and unicodedata.category(value[i])[0] in "LM"

    return value[index] in _JOINERS and letter_or_mark(index - 1) and letter_or_mark(index + 1)


def describe_character(char: str) -> str:
    """'U+202E RIGHT-TO-LEFT OVERRIDE': the code point and, where Unicode has one, its name."""
    code = ord(char)
    name = unicodedata.name(char, "") or _CONTROL_NAMES.get(code, "CONTROL CHARACTER")
    return f"U+{code:04X} {name}"


@deconstructible
class NoInvisibleCharacters:
    """Refuse control, format and invisible characters in text a person submits.

    Single-line fields (names, affiliations, URLs) refuse them all; multi-line fields keep
    line breaks and tabs. The same instance serves the model field, the form and the API.
    """

    def __init__(self, label: str, *, multiline: bool = False) -> None:
        self.label = label
        self.multiline = multiline

    def __call__(self, value: object) -> None:
        if not isinstance(value, str):
            return
        for index, char in enumerate(value):
            if self.multiline and char in _MULTILINE_ALLOWED:
                continue
            if is_invisible(char) and not _joins_letters(value, index):
                raise ValidationError(
                    INVISIBLE_CHARACTER.format(label=self.label, char=describe_character(char)),
                    code="invisible_character",
                )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, NoInvisibleCharacters)
            and self.label == other.label
            and self.multiline == other.multiline
        )

    def __hash__(self) -> int:
        return hash((self.label, self.multiline))


# Validators for text that is not a model field, shared by the page and the API.
ANSWER_TEXT = NoInvisibleCharacters("The answer", multiline=True)
