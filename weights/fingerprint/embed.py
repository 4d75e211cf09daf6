"""A recipient's bytes of a weight file, for any byte range, from the original's.

At every marked position (``keys.marked``) of a fingerprinted tensor the bf16/fp16 value
moves one unit in the last place, up (toward +inf) or down (toward -inf) as the recipient's
direction says. Zeros, subnormals, inf and nan stay, and so does a value the move would
take out of the normal finite range (the largest finite magnitude moving away from zero,
the smallest normal one moving toward it). Headers, pickles and padding are never touched:
the file keeps its size and still loads.

Each range is computed on its own, so Range requests, resumes and parallel clients all see
the same bytes; a range that cuts a 2-byte element in two needs that element's other byte,
which ``fingerprint_range`` asks ``read_at`` for (``FingerprintedReader`` reads it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .keys import run_marks
from .layout import FileLayout, LayoutError, TensorExtent

CHUNK = 4 << 20
# Bytes of one tensor transformed at a time: small enough for the temporaries to stay in
# the CPU's cache, large enough for numpy's per-call cost not to matter (measured).
PIECE = 1 << 20
SCRATCH_MAX = 16 << 20  # the largest working buffer a thread keeps between calls

# (exponent field, largest finite magnitude, smallest normal magnitude) as bit patterns.
FORMATS = {
    "bfloat16": (0x7F80, 0x7F7F, 0x0080),
    "float16": (0x7C00, 0x7BFF, 0x0400),
}
_MAGNITUDE = np.uint16(0x7FFF)

ERR_UNSUPPORTED = (
    "{path}: cannot fingerprint {name}: it is {dtype}, and one unit in the last place is "
    "defined here for bfloat16 and float16 weights only; publish the release in one of "
    "those, or unfingerprinted"
)
ERR_NONCONTIGUOUS = "{path}: cannot fingerprint {name}: its elements are not stored in order"
ERR_RANGE = "byte range [{start}, {end}) is not within the file's {size} bytes"
ERR_DATA = "got {got} bytes of original data for the {want}-byte range [{start}, {end})"
ERR_CUT = (
    "byte range [{start}, {end}) cuts a 2-byte element of {name} at byte {at}: pass read_at, "
    "or widen the range with element_bounds()"
)
ERR_SHORT = "{path}: could not read bytes [{start}, {end}): the file changed"
ERR_CHANGED = "{path}: the file is {size} bytes, its layout says {expected}: it changed"

ReadAt = Callable[[int, int], bytes]


class UnsupportedDtypeError(LayoutError):
    pass


def check_embeddable(layout: FileLayout) -> None:
    """Refuse a file whose weight matrices cannot carry the fingerprint: serving it
    unmarked would hand out copies that name nobody."""
    for e in layout.unmarkable:
        if e.dtype not in FORMATS:
            raise UnsupportedDtypeError(
                ERR_UNSUPPORTED.format(path=layout.path, name=e.stored_name, dtype=e.dtype)
            )
        raise LayoutError(ERR_NONCONTIGUOUS.format(path=layout.path, name=e.stored_name))


def ulp_step(values: np.ndarray, dtype: str, up: np.ndarray) -> np.ndarray:
    """``values`` (bf16/fp16 bit patterns, uint16) moved one ulp up where ``up``, down
    elsewhere, left alone where the rule skips them (see the module's docstring).

    In sign-magnitude a step is +-1 on the bit pattern: +1 where the magnitude grows (up on
    a positive value, down on a negative one). The rule then reads: the magnitude is normal
    before the step and after it, a normal magnitude m being ``m - smallest < exponent -
    smallest`` in uint16 arithmetic (zeros and subnormals wrap around to large values)."""
    exponent, _largest, smallest = (np.uint16(x) for x in FORMATS[dtype])
    span = exponent - smallest
    step = values >> np.uint16(15)  # the sign bit
    step ^= up  # 1 where the magnitude grows
    step <<= np.uint16(1)
    step -= np.uint16(1)  # +1 or -1 (0xFFFF), mod 2**16
    low = values & _MAGNITUDE
    low -= smallest
    ok = low < span
    low += step
    ok &= low < span
    step *= ok
    step += values
    return step


def marked_elements(
    extent: TensorExtent, release_key: bytes, code: bytes, first: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(positions relative to ``first``, up?) of the marked elements among the local
    elements [first, first + n) of ``extent``, ascending."""
    rows = extent.rows
    if rows.contiguous:
        positions, up = run_marks(release_key, extent.name, [rows.base + first], n, code)
        return positions, up  # type: ignore[return-value]
    length = rows.row_len
    r0, r1 = first // length, (first + n - 1) // length + 1
    starts = rows.row_starts(np.arange(r0, r1)).astype(np.int64)
    positions, up = run_marks(release_key, extent.name, starts, length, code)
    positions -= first - r0 * length
    keep = slice(np.searchsorted(positions, 0), np.searchsorted(positions, n))
    return positions[keep], up[keep]  # type: ignore[index]


def perturb(
    values: np.ndarray, extent: TensorExtent, release_key: bytes, code: bytes, first: int
) -> None:
    """Fingerprint, in place, the local elements [first, first + len(values)) of ``extent``
    given as uint16 bit patterns."""
    if not len(values):
        return
    positions, up = marked_elements(extent, release_key, code, first, len(values))
    values[positions] = ulp_step(values.take(positions), extent.dtype, up)


def _cut(layout: FileLayout, at: int) -> TensorExtent | None:
    """The fingerprinted extent whose element byte ``at`` falls inside of (not at its start)."""
    for e in layout.overlapping(at, at + 1):
        if e.fingerprinted and (at - e.file_offset) % e.itemsize:
            return e
    return None


def element_bounds(layout: FileLayout, start: int, end: int) -> tuple[int, int]:
    """[start, end) widened so that it cuts no element of a fingerprinted tensor."""
    if start >= end:
        return start, end
    if e := _cut(layout, start):
        start -= (start - e.file_offset) % e.itemsize
    if e := _cut(layout, end):
        end += e.itemsize - (end - e.file_offset) % e.itemsize
    return start, end


def transform(
    layout: FileLayout, release_key: bytes, code: bytes, at: int, buf: bytearray | memoryview
) -> None:
    """Fingerprint in place ``buf``, the original bytes [at, at + len(buf)) of the file,
    which must not cut an element of a fingerprinted tensor (see ``element_bounds``)."""
    end = at + len(buf)
    for e in layout.overlapping(at, end):
        if not e.fingerprinted:
            continue
        a, b = max(at, e.file_offset), min(end, e.end)
        for x in range(a, b, PIECE):
            y = min(x + PIECE, b)
            values = np.frombuffer(buf, dtype="<u2", count=(y - x) // 2, offset=x - at)
            perturb(values, e, release_key, code, (x - e.file_offset) // e.itemsize)


_local = threading.local()


def _scratch(n: int) -> memoryview:
    """``n`` bytes of this thread's working buffer, kept from call to call: a fresh buffer of
    a megabyte per call costs a third of the fingerprinting (measured; glibc maps one that
    large afresh each time, and each of its pages faults in again)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = bytearray(n)
        if n <= SCRATCH_MAX:  # a whole file read at once is not kept
            _local.buf = buf
    return memoryview(buf)[:n]


def fingerprint_range(
    layout: FileLayout,
    release_key: bytes,
    code: bytes,
    start: int,
    end: int,
    data: bytes | bytearray | memoryview,
    *,
    read_at: ReadAt | None = None,
) -> bytes:
    """The recipient's bytes [start, end) of the file, given the original's ``data`` for
    that range; ``read_at(a, b)`` supplies the original bytes [a, b) of an element the range
    cuts at either end (at most one byte on each side)."""
    if not 0 <= start <= end <= layout.size:
        raise ValueError(ERR_RANGE.format(start=start, end=end, size=layout.size))
    if len(data) != end - start:
        raise ValueError(ERR_DATA.format(got=len(data), want=end - start, start=start, end=end))
    check_embeddable(layout)
    lo, hi = element_bounds(layout, start, end)
    if (lo, hi) != (start, end) and read_at is None:
        at = start if _cut(layout, start) else end
        name = _cut(layout, at).stored_name  # type: ignore[union-attr]
        raise ValueError(ERR_CUT.format(start=start, end=end, name=name, at=at))
    buf = _scratch(hi - lo)
    if lo < start:
        buf[: start - lo] = read_at(lo, start)  # type: ignore[misc]
    buf[start - lo : end - lo] = memoryview(data).cast("B")
    if hi > end:
        buf[end - lo :] = read_at(end, hi)  # type: ignore[misc]
    transform(layout, release_key, code, lo, buf)
    return bytes(buf[start - lo : end - lo])


def _read_into(fd: int, view: memoryview, start: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], start + done)
        if n <= 0:
            raise LayoutError(ERR_SHORT.format(path=path, start=start, end=start + len(view)))
        done += n


class FingerprintedReader:
    """A recipient's copy of one file, read from the original on disk, for streaming."""

    def __init__(
        self,
        path: str | Path,
        layout: FileLayout,
        release_key: bytes,
        code: bytes,
        *,
        chunk_size: int = CHUNK,
    ) -> None:
        self.path = Path(path)
        self.layout = layout
        self._key, self._code = release_key, code
        self.chunk_size = chunk_size
        check_embeddable(layout)

    @property
    def size(self) -> int:
        return self.layout.size

    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        """The recipient's bytes [start, end), in chunks of at most ``chunk_size``."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(ERR_RANGE.format(start=start, end=end, size=self.size))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != self.size:
                raise LayoutError(ERR_CHANGED.format(path=self.path, size=size, expected=self.size))

            # One buffer for every chunk (an element cut at either end adds a byte or two).
            buf = memoryview(bytearray(min(self.chunk_size, end - start) + 4))
            for a in range(start, end, self.chunk_size):
                b = min(a + self.chunk_size, end)
                lo, hi = element_bounds(self.layout, a, b)
                part = buf[: hi - lo]
                _read_into(fd, part, lo, self.path)
                transform(self.layout, self._key, self._code, lo, part)
                yield bytes(part[a - lo : b - lo])
        finally:
            os.close(fd)

    def read_range(self, start: int, end: int) -> bytes:
        return b"".join(self.iter_range(start, end))


def fingerprint_file(
    path: str | Path,
    layout: FileLayout,
    release_key: bytes,
    code: bytes,
    *,
    chunk_size: int = CHUNK,
) -> Iterator[bytes]:
    """The recipient's whole file, in chunks (for hashing it, or writing it out)."""
    reader = FingerprintedReader(path, layout, release_key, code, chunk_size=chunk_size)
    return reader.iter_range(0, reader.size)
