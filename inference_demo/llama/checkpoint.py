"""Meta's release layout: ``params.json``, ``consolidated.NN.pth`` shards, ``checklist.chk``.

Shards are split as the reference model-parallel layers split them: column-parallel
weights (wq, wk, wv, w1, w3, output) along dim 0, row-parallel ones (wo, w2) along
dim 1, the embedding along dim 1 (LLaMA 1 and 2; LLaMA 3 splits it along dim 0, which
the loader detects), norms replicated.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weights.checksums import ChecklistError, parse_checklist

from .model import ModelArgs, Transformer

PARAMS = "params.json"
CHECKLIST = "checklist.chk"
SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

ERR_NO_PARAMS = "{path}: no params.json, not a Meta-layout checkpoint directory"
ERR_NO_SHARDS = "{path}: no consolidated.NN.pth shard files"
ERR_MISSING_SHARD = "{path}: shard {name} is missing"
ERR_CHECKSUM = "{path}: MD5 mismatch for {name} (checklist {expected}, file {actual})"
ERR_MISSING_LISTED = "{path}: {name} is listed in checklist.chk but missing"
ERR_SHAPE = "{key}: checkpoint shape {got} does not match the model's {expected}"
ERR_SHARD_SHAPE = "{key}: shards disagree on shape ({shapes})"
ERR_KEYS = "state dict keys differ from the model: missing {missing}, unexpected {unexpected}"
ERR_UNSAFE = "{path}: refused to load, the file is not a plain tensor archive ({reason})"
ERR_UNREADABLE = "{path}: not a readable PyTorch tensor archive ({reason})"
ERR_NOT_STATE_DICT = "{path}: expected a dict of tensors"
ERR_SPLIT = "{key}: size {size} on dim {dim} is not divisible by {n} shards"

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


class UnsafeCheckpointError(CheckpointError):
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


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checklist(path: Path) -> dict[str, str]:
    """``md5sum`` output, parsed by the same code that checks releases at publish time."""
    try:
        return parse_checklist(path.read_text())
    except ChecklistError as exc:
        raise ChecksumError(f"{path}: {exc}") from None


def write_checklist(directory: Path, names: Iterable[str], filename: str = CHECKLIST) -> None:
    lines = [f"{md5_file(directory / name)}  {name}\n" for name in sorted(names)]
    (directory / filename).write_text("".join(lines))


def verify_checklist(directory: Path, filename: str = CHECKLIST) -> None:
    for name, expected in read_checklist(directory / filename).items():
        path = directory / name
        if not path.exists():
            error = MissingShardError if SHARD_RE.match(name) else ChecksumError
            raise error(ERR_MISSING_LISTED.format(path=directory, name=name))
        actual = md5_file(path)
        if actual != expected:
            raise ChecksumError(
                ERR_CHECKSUM.format(path=directory, name=name, expected=expected, actual=actual)
            )


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


def load_shard(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met something that is not a tensor
        raise UnsafeCheckpointError(ERR_UNSAFE.format(path=path, reason=exc)) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(ERR_UNREADABLE.format(path=path, reason=exc)) from exc
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise CheckpointError(ERR_NOT_STATE_DICT.format(path=path))
    return state


def merge_shards(shards: list[dict[str, Tensor]], dim: int) -> dict[str, Tensor]:
    """Concatenate model-parallel shards back into one state dict (``dim`` is the model width)."""
    if len(shards) == 1:
        return {k: v for k, v in shards[0].items() if k not in IGNORED}
    merged = {}
    for key in shards[0]:
        if key in IGNORED:
            continue
        parts = [shard[key] for shard in shards]
        axis = split_dim(key)
        if key == "tok_embeddings.weight" and parts[0].shape[1] == dim:
            axis = 0  # LLaMA 3 splits the embedding by vocabulary
        if axis is None:
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) != 1:
                raise ShapeMismatchError(ERR_SHARD_SHAPE.format(key=key, shapes=sorted(shapes)))
            merged[key] = parts[0]
            continue
        other = {tuple(s for i, s in enumerate(p.shape) if i != axis) for p in parts}
        if len(other) != 1:
            shapes = sorted(tuple(p.shape) for p in parts)
            raise ShapeMismatchError(ERR_SHARD_SHAPE.format(key=key, shapes=shapes))
        merged[key] = torch.cat(parts, dim=axis)
    return merged


def split_state_dict(state_dict: dict[str, Tensor], n: int) -> list[dict[str, Tensor]]:
    """The inverse of ``merge_shards`` in LLaMA 1 layout."""
    shards: list[dict[str, Tensor]] = [{} for _ in range(n)]
    for key, tensor in state_dict.items():
        axis = split_dim(key)
        if axis is None:
            parts = [tensor] * n
        else:
            if tensor.shape[axis] % n:
                raise CheckpointError(
                    ERR_SPLIT.format(key=key, size=tensor.shape[axis], dim=axis, n=n)
                )
            parts = list(tensor.chunk(n, dim=axis))
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone().contiguous()
    return shards


def read_params(directory: Path) -> dict[str, Any]:
    path = directory / PARAMS
    if not path.exists():
        raise CheckpointError(ERR_NO_PARAMS.format(path=directory))
    return json.loads(path.read_text())


def load_state_dict(
    directory: str | Path, *, verify: bool = True, max_seq_len: int = 2048
) -> tuple[ModelArgs, dict[str, Tensor]]:
    directory = Path(directory)
    params = read_params(directory)
    paths = shard_paths(directory)
    if verify and (directory / CHECKLIST).exists():
        verify_checklist(directory)
    state_dict = merge_shards([load_shard(p) for p in paths], params["dim"])
    if params.get("vocab_size", -1) <= 0:  # LLaMA 1 leaves it to the tokenizer
        params = {**params, "vocab_size": state_dict["tok_embeddings.weight"].shape[0]}
    return ModelArgs.from_params(params, max_seq_len=max_seq_len), state_dict


def check_state_dict(model: Transformer, state_dict: dict[str, Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(ERR_KEYS.format(missing=missing, unexpected=unexpected))
    for key, tensor in expected.items():
        if state_dict[key].shape != tensor.shape:
            raise ShapeMismatchError(
                ERR_SHAPE.format(
                    key=key, got=tuple(state_dict[key].shape), expected=tuple(tensor.shape)
                )
            )


def load_model(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_seq_len: int = 2048,
    verify: bool = True,
) -> Transformer:
    """Build on the meta device and adopt the (memory-mapped) checkpoint tensors."""
    args, state_dict = load_state_dict(directory, verify=verify, max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_checkpoint(
    directory: str | Path,
    params: dict[str, Any],
    state_dict: dict[str, Tensor],
    *,
    n_shards: int = 1,
) -> list[Path]:
    """Write params.json, ``n_shards`` consolidated shards and checklist.chk."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PARAMS).write_text(json.dumps(params) + "\n")
    paths = []
    for i, shard in enumerate(split_state_dict(state_dict, n_shards)):
        path = directory / f"consolidated.{i:02d}.pth"
        torch.save(shard, path)
        paths.append(path)
    write_checklist(directory, [PARAMS, *(p.name for p in paths)])
    return paths


# Streaming: one merged tensor at a time, for converters that must not hold a whole release.


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


@dataclass(frozen=True)
class StreamingCheckpoint:
    """A Meta-layout checkpoint opened without reading its tensors into memory."""

    args: ModelArgs
    params: dict[str, Any]
    tensors: dict[str, ShardedTensor]


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


def open_checkpoint(
    directory: str | Path, *, verify: bool = True, max_seq_len: int = 2048
) -> StreamingCheckpoint:
    """Open every shard memory-mapped and check that the slices fit together; reads no tensor
    data (beyond `verify`'s MD5 pass over the files)."""
    directory = Path(directory)
    params = read_params(directory)
    paths = shard_paths(directory)
    if verify and (directory / CHECKLIST).exists():
        verify_checklist(directory)
    shards = [load_shard(p) for p in paths]
    keys = [k for k in shards[0] if k not in IGNORED]
    for path, shard in zip(paths[1:], shards[1:], strict=True):
        if set(shard) - IGNORED != set(keys):
            raise CheckpointError(
                ERR_KEYS.format(
                    missing=sorted(set(keys) - set(shard)),
                    unexpected=sorted(set(shard) - set(keys) - IGNORED),
                )
                + f" ({path.name} against {paths[0].name})"
            )
    tensors = {}
    for key in keys:
        parts = [shard[key] for shard in shards]
        axis, shape = _merged_shape(key, parts, params["dim"])
        tensors[key] = ShardedTensor(key=key, parts=tuple(parts), axis=axis, shape=shape)
    if params.get("vocab_size", -1) <= 0:  # LLaMA 1 leaves it to the tokenizer
        params = {**params, "vocab_size": tensors["tok_embeddings.weight"].shape[0]}
    args = ModelArgs.from_params(params, max_seq_len=max_seq_len)
    return StreamingCheckpoint(args=args, params=params, tensors=tensors)
