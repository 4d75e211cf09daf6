"""Meta's model-parallel shard layout, without torch: file names, which axis each tensor
is split on, finding the shards of a directory, and the plan of how their slices merge.

Shards are split as the reference model-parallel layers split them: column-parallel
weights (wq, wk, wv, w1, w3, output) along dim 0, row-parallel ones (wo, w2) along
dim 1, the embedding along dim 1 (LLaMA 1 and 2; LLaMA 3 splits it along dim 0, which
the loader detects), norms replicated.

The loader (``checkpoint``) and the web process's fingerprinting (``weights.fingerprint.
layout``, which must not import torch: DESIGN decision 6) both read the rules here. The
merge plan looks only at shapes: its parts may be tensors or anything with a ``shape``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from weights.checksums import ChecklistError, parse_checklist

if TYPE_CHECKING:
    import torch
    from torch import Tensor

PARAMS = "params.json"
CHECKLIST = "checklist.chk"
SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

ERR_NO_SHARDS = "{path}: no consolidated.NN.pth shard files"
ERR_MISSING_SHARD = "{path}: shard {name} is missing"
ERR_SHARD_SHAPE = "{key}: shards disagree on shape ({shapes})"
ERR_SHARD_KEY = "{key}: missing from {missing} (present in {present})"

COLUMN_PARALLEL = {"wq", "wk", "wv", "w1", "w3", "output"}
ROW_PARALLEL = {"wo", "w2"}
IGNORED = {"rope.freqs"}


class CheckpointError(Exception):
    pass


class MissingShardError(CheckpointError):
    pass


class ChecksumError(CheckpointError):
    pass


class ShapeMismatchError(CheckpointError):
    pass


class ShardKeysError(CheckpointError):
    pass


def split_dim(key: str) -> int | None:
    """The dimension a model-parallel checkpoint splits ``key`` on; None if replicated."""
    parts = key.split(".")
    module = parts[-2] if len(parts) > 1 else key
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL or module == "tok_embeddings":
        return 1
    return None


def read_checklist(path: Path) -> dict[str, str]:
    """``md5sum`` output, parsed by the same code that checks releases at publish time."""
    try:
        return parse_checklist(path.read_text())
    except ChecklistError as exc:
        raise ChecksumError(f"{path}: {exc}") from None


def shard_paths(directory: Path) -> list[Path]:
    """All shards in order; a gap in the numbering, or a shard the checklist names, is missing."""
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := SHARD_RE.match(p.name))}
    expected = max(found, default=-1) + 1
    checklist = directory / CHECKLIST
    if checklist.exists():
        listed = [int(m.group(1)) for n in read_checklist(checklist) if (m := SHARD_RE.match(n))]
        expected = max([expected, *(i + 1 for i in listed)])
    if expected == 0:
        raise MissingShardError(ERR_NO_SHARDS.format(path=directory))
    for i in range(expected):
        if i not in found:
            name = f"consolidated.{i:02d}.pth"
            raise MissingShardError(ERR_MISSING_SHARD.format(path=directory, name=name))
    return [found[i] for i in range(expected)]


def check_shard_keys(names: list[str], key_sets: list[set[str]]) -> list[str]:
    """The keys every shard must share, in the first shard's order; a key missing from some
    shard names the key and the shards that lack and hold it."""
    first = [k for k in key_sets[0] if k not in IGNORED]
    union = set().union(*key_sets) - IGNORED
    for key in [*first, *sorted(union - set(first))]:
        missing = [n for n, keys in zip(names, key_sets, strict=True) if key not in keys]
        if missing:
            present = [n for n, keys in zip(names, key_sets, strict=True) if key in keys]
            raise ShardKeysError(
                ERR_SHARD_KEY.format(
                    key=key, missing=", ".join(missing), present=", ".join(present)
                )
            )
    return first


def plan_tensors(
    names: list[str], shards: list[dict[str, Tensor]], dim: int
) -> dict[str, ShardedTensor]:
    """Check that the shards fit together and describe each merged tensor; reads no data."""
    keys = check_shard_keys(names, [set(shard) for shard in shards])
    tensors = {}
    for key in keys:
        parts = [shard[key] for shard in shards]
        axis, shape = _merged_shape(key, parts, dim)
        tensors[key] = ShardedTensor(key=key, parts=tuple(parts), axis=axis, shape=shape)
    return tensors


def slice_offsets(tensor: ShardedTensor) -> list[int]:
    """Where each shard's slice starts along the merge axis (0s when replicated)."""
    if tensor.axis is None:
        return [0] * len(tensor.parts)
    sizes = [p.shape[tensor.axis] for p in tensor.parts]
    return [sum(sizes[:i]) for i in range(len(sizes))]


@dataclass(frozen=True)
class ShardedTensor:
    """One checkpoint tensor as its memory-mapped model-parallel slices, not yet merged."""

    key: str
    parts: tuple[Tensor, ...]
    axis: int | None  # the axis the slices are concatenated on; None when replicated
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def nbytes_as(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * dtype.itemsize


def _merged_shape(key: str, parts: list[Tensor], dim: int) -> tuple[int | None, tuple[int, ...]]:
    """The concatenation axis and merged shape of `key`, as `merge_shards` would merge it."""
    axis = split_dim(key) if len(parts) > 1 else None
    if key == "tok_embeddings.weight" and axis is not None and parts[0].shape[1] == dim:
        axis = 0  # LLaMA 3 splits the embedding by vocabulary
    if axis is None:
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ShapeMismatchError(ERR_SHARD_SHAPE.format(key=key, shapes=sorted(shapes)))
        return None, tuple(parts[0].shape)
    other = {tuple(s for i, s in enumerate(p.shape) if i != axis) for p in parts}
    if len(other) != 1:
        shapes = sorted(tuple(p.shape) for p in parts)
        raise ShapeMismatchError(ERR_SHARD_SHAPE.format(key=key, shapes=shapes))
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    return axis, tuple(shape)
