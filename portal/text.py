"""Text from outside made fit for one line: a mail header, a shell comment, a title."""

from __future__ import annotations

import unicodedata

_BREAKS = frozenset({"Cc", "Zl", "Zp"})  # controls and line/paragraph separators
_DROPPED = frozenset({"Cf", "Cs"})  # bidi overrides, zero-width marks, lone surrogates


def one_line(text: str) -> str:
    """`text` on one line: line breaks and controls become a space, invisible format
    characters go, and runs of whitespace collapse to one space.

    Names come from applicants and operators; a stray CR would make Django refuse a mail
    (BadHeaderError) or end a comment in a shell script, and a bidi override would
    disguise what a person reads.
    """
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category in _BREAKS:
            kept.append(" ")
        elif category not in _DROPPED:
            kept.append(char)
    return " ".join("".join(kept).split())
