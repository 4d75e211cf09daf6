"""Where a recipient's copy differs from the published weights, and in which direction.

One coordinate system for every layout: a position is (tensor, element), where *tensor*
is the Meta name of the merged tensor (``layers.0.attention.wq.weight``) and *element* its
flat row-major index in the full, merged, unpermuted tensor. A model-parallel shard of
``consolidated.NN.pth`` and a transformers safetensors file (q/k rows permuted) both map
their elements onto it, so a conversion carries the fingerprint over unchanged and tracing
works from either layout.

- Whether a position is marked depends only on (release key, tensor, element).
- The direction (+1: the value moves one unit in the last place up, -1: down) depends only
  on (recipient code, tensor, element).

Both come from a counter-based hash, splitmix64 of a keyed per-tensor seed plus a *block*
number, one block being 64 consecutive elements (8 groups of 8). The release key's word
for a block marks exactly one element in each group of 8, chosen by 3 of its bits, so 1/8
of every tensor is marked, evenly spread; the recipient's word for a block gives each of its
64 elements a direction bit. Any byte range of any recipient's file is computed on its own,
with no state, from two hashes per 64 elements, and the marked positions of a range come
out as indices directly (no per-element mask to scan). Under an innocent recipient's code
the directions are independent fair coins of the position, which is what makes the
tracer's false-match probability computable.

Pure numpy; no Django, no torch. ``marked``/``directions`` take any index array (the
tracer's); ``run_marks`` lists the marked positions (and directions) of runs of consecutive
indices, vectorised per block, for the embedder and for a tracer reading whole tensors.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

import numpy as np

KEY_BYTES = 32
# Share of a fingerprinted tensor's elements that are marked: one in each group of
# 2**DENSITY_LOG2. More marks give more evidence against the same, tiny, perturbation per
# weight (one ulp in 1 of 8 weights).
DENSITY_LOG2 = 3
DENSITY = 1 / (1 << DENSITY_LOG2)
GROUP = 1 << DENSITY_LOG2
BLOCK_LOG2 = 6  # 64 elements per hashed block: one direction bit of a 64-bit word each
BLOCK = 1 << BLOCK_LOG2
GROUPS = BLOCK // GROUP  # 8 groups per block, 3 bits of the position word each

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def new_release_key() -> bytes:
    """A fresh secret for a release marked fingerprinted (kept with the release)."""
    import secrets

    return secrets.token_bytes(KEY_BYTES)


def recipient_code(release_key: bytes, grant_id: int) -> bytes:
    """A grant's code: derived, never stored, so the release key alone recomputes them all."""
    return hmac.new(release_key, f"recipient:{grant_id}".encode(), hashlib.sha256).digest()


def is_fingerprinted(tensor: str, shape: tuple[int, ...]) -> bool:
    """The large weight matrices: every 2-D tensor (norms and other vectors stay exact)."""
    return len(shape) == 2 and tensor.endswith(".weight")


@functools.lru_cache(maxsize=4096)  # one HMAC per (key, tensor), not one per chunk
def _seed(key: bytes, purpose: bytes, tensor: str) -> np.uint64:
    digest = hmac.new(key, purpose + b"\0" + tensor.encode(), hashlib.sha256).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def _mix(seed: np.uint64, counter: np.ndarray) -> np.ndarray:
    """splitmix64 of seed + (counter + 1) * golden: a fresh 64-bit value per counter."""
    return _finish(seed, _spread(counter))


def _spread(counter: np.ndarray) -> np.ndarray:
    """(counter + 1) * golden: the part of ``_mix`` that does not depend on the seed."""
    with np.errstate(over="ignore"):
        z = counter.astype(np.uint64)
        z += np.uint64(1)
        z *= _GOLDEN
        return z


def _finish(seed: np.uint64, spread: np.ndarray) -> np.ndarray:
    """splitmix64's mixing of seed + spread (one temporary for its three shifts)."""
    with np.errstate(over="ignore"):
        z = spread + seed
        t = np.empty_like(z)
        for shift, multiplier in ((30, _M1), (27, _M2)):
            np.right_shift(z, np.uint64(shift), out=t)
            z ^= t
            z *= multiplier
        np.right_shift(z, np.uint64(31), out=t)
        z ^= t
        return z


def _position_words(release_key: bytes, tensor: str, blocks: np.ndarray) -> np.ndarray:
    return _mix(_seed(release_key, b"position", tensor), blocks)


def _direction_words(code: bytes, tensor: str, blocks: np.ndarray) -> np.ndarray:
    return _mix(_seed(code, b"direction", tensor), blocks)


def _selector_shift(group: np.ndarray) -> np.ndarray:
    """Where group ``g``'s 3 selector bits start in its block's word: the low nibbles of
    bytes 0..3 for groups 0..3, their high nibbles for groups 4..7."""
    return ((group & 3) << 3) | ((group >> 2) << 2)


def marked(release_key: bytes, tensor: str, index: np.ndarray) -> np.ndarray:
    """Boolean mask: which of these flat merged indices of ``tensor`` are marked: in each
    group of 8, the one its block's word selects (``_selector_shift``)."""
    index = np.asarray(index).astype(np.int64)
    words = _position_words(release_key, tensor, index >> BLOCK_LOG2)
    group = ((index >> DENSITY_LOG2) & (GROUPS - 1)).astype(np.uint64)
    chosen = (words >> _selector_shift(group)) & np.uint64(GROUP - 1)
    return chosen == (index & (GROUP - 1)).astype(np.uint64)


def directions(code: bytes, tensor: str, index: np.ndarray) -> np.ndarray:
    """+1 or -1 (int8) per index: bit ``index % 64`` of its block's word."""
    index = np.asarray(index).astype(np.int64)
    words = _direction_words(code, tensor, index >> BLOCK_LOG2)
    up = ((words >> (index & (BLOCK - 1)).astype(np.uint64)) & np.uint64(1)).astype(np.int8)
    return up * np.int8(2) - np.int8(1)


def _selectors(words: np.ndarray) -> np.ndarray:
    """(len(words), 8) uint8: each block's chosen element in each of its 8 groups."""
    low = words.astype(np.uint32)
    packed = (low & np.uint32(0x07070707)).astype(np.uint64)
    packed |= ((low >> np.uint32(4)) & np.uint32(0x07070707)).astype(np.uint64) << np.uint64(32)
    return packed.astype("<u8", copy=False).view(np.uint8).reshape(-1, GROUPS)


def run_marks(
    release_key: bytes,
    tensor: str,
    starts: np.ndarray,
    length: int,
    code: bytes | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The marked elements of the runs ``starts[k] + arange(length)`` (merged indices), as
    ascending positions ``k * length + j`` in the runs laid end to end, with, given a
    ``code``, whether each moves up (else None). Equal to ``marked``/``directions`` on
    every element of the runs, at a cost per 64 elements instead of per element."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if len(starts) == 1:
        return _one_run(release_key, tensor, int(starts[0]), length, code)
    runs = len(starts)
    first = starts >> BLOCK_LOG2
    shift = starts - (first << BLOCK_LOG2)  # where each run starts in its first block
    n_blocks = (length + BLOCK - 1) // BLOCK + int(bool(shift.any()))
    blocks = (first[:, None] + np.arange(n_blocks, dtype=np.int64)).reshape(-1)
    chosen, up = _block_marks(release_key, tensor, blocks, code)
    # The runs' blocks laid end to end.
    positions = np.arange(0, chosen.size * GROUP, GROUP, dtype=np.int64)
    positions += chosen.reshape(-1)
    if not shift.any() and length == n_blocks * BLOCK:
        return positions, up
    # Moved to where each run's elements start, less the elements outside their run.
    run_at = np.arange(runs, dtype=np.int64) * (length - n_blocks * BLOCK) - shift
    positions += np.repeat(run_at, n_blocks * GROUPS)
    local = positions - np.repeat(np.arange(runs, dtype=np.int64) * length, n_blocks * GROUPS)
    keep = (local >= 0) & (local < length)
    return positions[keep], None if up is None else up[keep]


def _one_run(
    release_key: bytes, tensor: str, start: int, length: int, code: bytes | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``run_marks`` of one run (the embedder's case: a piece of a tensor), its arithmetic
    on plain integers."""
    first, shift = divmod(start, BLOCK)
    n_blocks = -(-(shift + length) // BLOCK)
    blocks = np.arange(first, first + n_blocks, dtype=np.int64)
    chosen, up = _block_marks(release_key, tensor, blocks, code)
    positions = np.arange(-shift, n_blocks * BLOCK - shift, GROUP, dtype=np.int64)
    positions += chosen.reshape(-1)
    if not shift and length == n_blocks * BLOCK:
        return positions, up
    # Ascending: cut the ends of the first and last blocks.
    keep = slice(np.searchsorted(positions, 0), np.searchsorted(positions, length))
    return positions[keep], None if up is None else up[keep]


def _block_marks(
    release_key: bytes, tensor: str, blocks: np.ndarray, code: bytes | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(len(blocks), 8) uint8: each block's chosen element in each of its groups; with a
    ``code``, whether each moves up (flat, bool), else None."""
    spread = _spread(blocks)
    chosen = _selectors(_finish(_seed(release_key, b"position", tensor), spread))
    if code is None:
        return chosen, None
    direction = _finish(_seed(code, b"direction", tensor), spread).astype("<u8", copy=False)
    up = (direction.view(np.uint8).reshape(-1, GROUPS) >> chosen) & np.uint8(1)
    return chosen, up.reshape(-1).view(bool)
