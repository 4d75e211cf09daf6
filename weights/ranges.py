"""HTTP Range and If-Range for the file endpoint (RFC 9110 §14).

Only single byte ranges are honoured. A request with several ranges
(`bytes=0-9,20-29`) is answered with the whole file and 200, which RFC 9110
permits ("a server MAY ignore the Range header field"): multipart/byteranges
would cost code for no client we care about (wget, curl, aria2c and our CLI all
send one range per request), and a full response is always correct.

Other deliberate choices:
- The grammar is strict: `bytes=` in lower case, no whitespace, one range. Anything
  else is ignored and the whole file is served (also permitted). The same header
  then means the same bytes to us, to nginx (X-Accel-Redirect) and to S3 (a
  presigned GET with the Range signed in), so what we charge is what they send.
- A range that starts at or past the end of the file is unsatisfiable (416).
- `bytes=-0` asks for nothing and is unsatisfiable; `bytes=-n` larger than the
  file means the whole file, as a 206.
- If-Range is compared strongly with our ETag; anything else (a weak tag, a
  date: we send no Last-Modified) does not match and the whole file is served.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SINGLE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)
MAX_HEADER = 1024  # longer Range headers are not worth parsing; serve the whole file


class Unsatisfiable(Exception):
    """The range starts beyond the end of the file: answer 416 with `bytes */size`."""


@dataclass(frozen=True)
class ByteRange:
    """Inclusive byte positions, already clamped to the file."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Parse a Range header against a file of `size` bytes.

    Returns None when the whole file should be served (no header, malformed, another
    unit, several ranges), a ByteRange for one satisfiable range, and raises
    Unsatisfiable when the single range lies outside the file.
    """
    if not header or len(header) > MAX_HEADER:
        return None
    spec = _SINGLE.fullmatch(header)
    if spec is None:
        return None  # malformed, another unit, or several ranges
    first, last = spec.groups()
    if first:
        start = int(first)
        if last and int(last) < start:
            return None  # invalid range-spec: ignore the header
        if start >= size:
            raise Unsatisfiable
        end = min(int(last), size - 1) if last else size - 1
        return ByteRange(start, end, size)
    if not last:
        return None  # "bytes=-"
    suffix = int(last)
    if suffix == 0 or size == 0:
        raise Unsatisfiable
    return ByteRange(max(0, size - suffix), size - 1, size)


def if_range_allows(if_range: str | None, etag: str) -> bool:
    """True when the Range header may be honoured: no If-Range, or a strong match of the ETag."""
    if if_range is None:
        return True
    return if_range.strip() == etag


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match uses weak comparison: `W/"x"` matches `"x"`; `*` matches anything."""
    if not if_none_match:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)
