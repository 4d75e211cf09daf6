"""Which paths a release may contain: one rule for publishing and for every download door."""

from __future__ import annotations


def artifact_path_ok(path: str) -> bool:
    """A release-relative path: no `..` or `.` segments, not absolute, no backslash, NUL or
    control characters, no empty segments. Checked before any lookup, so storage is never
    asked for anything a release could not contain."""
    if not path or path.startswith("/") or "\\" in path:
        return False
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        return False
    return all(segment not in ("", ".", "..") for segment in path.split("/"))
