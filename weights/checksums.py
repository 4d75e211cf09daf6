"""Streaming digests and md5sum-style checklists (Meta's `checklist.chk`)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

CHUNK_SIZE = 8 * 1024 * 1024
CHECKLIST_NAMES = frozenset({"checklist.chk", "tokenizer_checklist.chk"})

# `<md5>  <name>` (text mode) or `<md5> *<name>` (binary mode), as md5sum writes them.
_LINE = re.compile(r"^(?P<md5>[0-9a-fA-F]{32}) (?: |\*)(?P<name>.+)$")


class ChecklistError(ValueError):
    """A checklist line that is not in md5sum format."""


def file_digests(
    path: Path | str,
    *,
    chunk_size: int = CHUNK_SIZE,
    progress: Callable[[int], object] | None = None,
) -> tuple[str, str, int]:
    """Return (sha256_hex, md5_hex, size) of a file, reading it once in chunks."""
    sha256 = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            chunk = view[:n]
            sha256.update(chunk)
            md5.update(chunk)
            size += n
            if progress is not None:
                progress(n)
    return sha256.hexdigest(), md5.hexdigest(), size


def parse_checklist(text: str) -> dict[str, str]:
    """Map each name in an md5sum-format checklist to its lower-case MD5."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            raise ChecklistError(f"line {number} is not '<md5>  <name>': {line[:80]!r}")
        name = match["name"].removeprefix("./")
        if name in entries:
            raise ChecklistError(f"line {number} lists {name} a second time")
        entries[name] = match["md5"].lower()
    return entries


def format_checklist(entries: dict[str, str]) -> str:
    """Render entries the way md5sum does, sorted by name."""
    return "".join(f"{md5}  {name}\n" for name, md5 in sorted(entries.items()))
