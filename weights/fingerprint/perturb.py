"""Reference fingerprint: a recipient's copy of *merged* tensors, computed in memory.

The embedding engine (``embed``) changes file bytes range by range; this module does the
same thing the simplest way, on whole merged Meta-coordinate tensors, so that tests and
the robustness bench can make recipient copies, and so the engine has an independent
reference to agree with. The rule, for every fingerprinted tensor (``keys.is_fingerprinted``)
stored as bfloat16 or float16: at each marked flat index (``keys.marked``), the value
moves one unit in the last place numerically up (direction +1) or down (-1), as
``keys.directions`` says for the recipient's code. Zeros, subnormals, inf and nan stay, and
so does a value the move would take out of the normal finite range (the largest finite
magnitude moving away from zero, the smallest normal one moving toward it). Every other
tensor, and every tensor in another dtype, is left exactly as it was.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from inference_demo.llama.checkpoint import PARAMS, load_state_dict, save_checkpoint, shard_paths

from .keys import directions, is_fingerprinted, marked

CHUNK_ELEMENTS = 1 << 18
# Files of a Meta release that are copied unchanged next to a recipient's shards.
SIDE_FILES = ("tokenizer.model", "tokenizer_checklist.chk")


@dataclass(frozen=True)
class BitFormat:
    """A 16-bit IEEE-style float format, by its field widths."""

    exponent_bits: int
    mantissa_bits: int

    @property
    def exponent_mask(self) -> np.uint16:
        return np.uint16(((1 << self.exponent_bits) - 1) << self.mantissa_bits)

    @property
    def largest(self) -> np.uint16:
        """The largest finite magnitude, as a bit pattern."""
        return np.uint16(int(self.exponent_mask) - 1)

    @property
    def smallest(self) -> np.uint16:
        """The smallest normal magnitude, as a bit pattern."""
        return np.uint16(1 << self.mantissa_bits)


FORMATS = {torch.bfloat16: BitFormat(8, 7), torch.float16: BitFormat(5, 10)}
SIGN = np.uint16(0x8000)
MAGNITUDE = np.uint16(0x7FFF)


def bit_format(dtype: torch.dtype) -> BitFormat | None:
    return FORMATS.get(dtype)


def tensor_bits(tensor: Tensor) -> np.ndarray:
    """A flat uint16 copy of a bf16/fp16 tensor's bit patterns."""
    return tensor.detach().contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)


def bits_to_float32(bits: np.ndarray, fmt: BitFormat) -> np.ndarray:
    if fmt.mantissa_bits == 7:  # bfloat16: the top half of a float32
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def nudge(bits: np.ndarray, fmt: BitFormat, up: np.ndarray) -> np.ndarray:
    """``bits`` moved one ulp numerically up where ``up``, down elsewhere; unchanged where
    the rule skips them."""
    magnitude = bits & MAGNITUDE
    exponent = magnitude & fmt.exponent_mask
    grows = up != ((bits & SIGN) != 0)  # numerically up is a larger magnitude when positive
    movable = (exponent != 0) & (exponent != fmt.exponent_mask)
    movable &= ~(grows & (magnitude == fmt.largest))
    movable &= ~(~grows & (magnitude == fmt.smallest))
    moved = np.where(grows, bits.astype(np.int32) + 1, bits.astype(np.int32) - 1)
    return np.where(movable, moved.astype(np.uint16), bits)


def marked_positions(release_key: bytes, name: str, numel: int) -> Iterator[np.ndarray]:
    """The marked flat indices of a tensor, ascending, a chunk at a time (chunks of a few
    hundred thousand elements keep the hash's temporaries in cache)."""
    for start in range(0, numel, CHUNK_ELEMENTS):
        index = np.arange(start, min(numel, start + CHUNK_ELEMENTS), dtype=np.int64)
        yield index[marked(release_key, name, index)]


def fingerprint_tensor(
    name: str,
    tensor: Tensor,
    release_key: bytes,
    code: bytes,
    *,
    cache: dict[str, np.ndarray] | None = None,
) -> Tensor:
    """A recipient's copy of one merged tensor (a new tensor; the input is not changed).
    ``cache`` keeps each tensor's marked positions for the next recipient of the release."""
    fmt = bit_format(tensor.dtype)
    if fmt is None or not is_fingerprinted(name, tuple(tensor.shape)):
        return tensor
    bits = tensor_bits(tensor).copy()
    if cache is None:
        chunks: Iterable[np.ndarray] = marked_positions(release_key, name, len(bits))
    else:
        if name not in cache:
            cache[name] = np.concatenate(list(marked_positions(release_key, name, len(bits))))
        chunks = [cache[name]]
    for index in chunks:
        up = directions(code, name, index) > 0
        bits[index] = nudge(bits[index], fmt, up)
    out = torch.from_numpy(bits.view(np.int16)).view(tensor.dtype)
    return out.reshape(tensor.shape)


def fingerprint_state_dict(
    state: dict[str, Tensor], release_key: bytes, code: bytes
) -> dict[str, Tensor]:
    """A recipient's copy of a merged state dict; tensors that carry no marks are shared."""
    return {k: fingerprint_tensor(k, t, release_key, code) for k, t in state.items()}


def write_recipient_copy(
    original_dir: str | Path,
    out_dir: str | Path,
    release_key: bytes,
    code: bytes,
    *,
    cache: dict[str, np.ndarray] | None = None,
) -> Path:
    """A recipient's Meta-layout copy of a release: same shard count, params, tokenizer.
    Pass the same ``cache`` (a dict) for every recipient of a release to mark it once."""
    original_dir, out_dir = Path(original_dir), Path(out_dir)
    n_shards = len(shard_paths(original_dir))
    params = json.loads((original_dir / PARAMS).read_text())
    _, state = load_state_dict(original_dir, verify=False)
    for key in list(state):
        state[key] = fingerprint_tensor(key, state[key], release_key, code, cache=cache)
    save_checkpoint(out_dir, params, state, n_shards=n_shards)
    for name in SIDE_FILES:
        if (original_dir / name).exists():
            shutil.copyfile(original_dir / name, out_dir / name)
    return out_dir
