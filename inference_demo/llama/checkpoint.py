"""Meta's release layout: ``params.json``, ``consolidated.NN.pth`` shards, ``checklist.chk``.

How shards are split and merged (which axis each tensor is split on, the merge plan) is in
``shards``, without torch, so that the web process's fingerprinting reads the same rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .model import ModelArgs, Transformer
from .shards import (
    CHECKLIST,
    ERR_SHARD_SHAPE,
    PARAMS,
    SHARD_RE,
    CheckpointError,
    ChecksumError,
    MissingShardError,
    ShapeMismatchError,
    ShardedTensor,
    plan_tensors,
    read_checklist,
    shard_paths,
    slice_offsets,
    split_dim,
)

# Re-exported: the loader's errors and helpers, as callers knew them.
from .shards import ShardKeysError as ShardKeysError
from .shards import _merged_shape as _merged_shape

ERR_NO_PARAMS = "{path}: no params.json, not a Meta-layout checkpoint directory"
ERR_CHECKSUM = "{path}: MD5 mismatch for {name} (checklist {expected}, file {actual})"
ERR_MISSING_LISTED = "{path}: {name} is listed in checklist.chk but missing"
ERR_SHAPE = "{key}: checkpoint shape {got} does not match the model's {expected}"
ERR_KEYS = "state dict keys differ from the model: missing {missing}, unexpected {unexpected}"
ERR_UNSAFE = "{path}: refused to load, the file is not a plain tensor archive ({reason})"
ERR_UNREADABLE = "{path}: not a readable PyTorch tensor archive ({reason})"
ERR_NOT_STATE_DICT = "{path}: expected a dict of tensors"
ERR_SPLIT = "{key}: size {size} on dim {dim} is not divisible by {n} shards"
ERR_PARAM_UNKNOWN = "{path}: unknown params.json key {key!r} (supported: {supported})"
ERR_PARAM_UNSUPPORTED = "{path}: params.json sets {key}={value!r}, which is not supported: {why}"
ERR_PARAM_REQUIRED = "{path}: params.json lacks {key!r}"
ERR_PARAMS_JSON = "{path}: params.json is not a JSON object ({reason})"


# Every key Meta's LLaMA 1, 2 and 3 params.json files carry. max_batch_size and max_seq_len
# (in some forks' files) are serving limits the caller sets, so they are accepted and unused.
SUPPORTED_PARAMS = {
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "max_batch_size",
    "max_seq_len",
}
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")
# Keys that change the architecture: silently ignoring them would give wrong output.
UNSUPPORTED_PARAMS = {
    "use_scaled_rope": "LLaMA 3.1's frequency-scaled RoPE is not implemented, plain RoPE "
    "would silently give wrong output",
}
VERIFY_CACHE_ENV = "INFERENCE_VERIFY_CACHE"
VERIFY_CACHE_NAME = "checkpoint-verified.json"


class UnsafeCheckpointError(CheckpointError):
    pass


class ParamsError(CheckpointError):
    pass


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


# Verify once: a file whose (size, mtime_ns, inode) matches what was hashed is not hashed again.


def default_verify_cache() -> Path:
    """$INFERENCE_VERIFY_CACHE, else settings.INFERENCE_VERIFY_CACHE, else beside the portal's
    var dir (settings.VAR_DIR, or $PORTAL_VAR_DIR outside Django)."""
    if env := os.environ.get(VERIFY_CACHE_ENV):
        return Path(env)
    try:
        from django.conf import settings

        if settings.configured:
            configured = getattr(settings, "INFERENCE_VERIFY_CACHE", None)
            return Path(configured) if configured else Path(settings.VAR_DIR) / VERIFY_CACHE_NAME
    except ImportError:
        pass
    var = os.environ.get("PORTAL_VAR_DIR") or Path(__file__).resolve().parents[2] / "var"
    return Path(var) / VERIFY_CACHE_NAME


def _file_identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _read_verify_cache(cache: Path) -> dict[str, dict[str, Any]]:
    try:
        entries = json.loads(cache.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}  # absent or damaged: everything is hashed again, nothing is trusted
    return entries if isinstance(entries, dict) else {}


def _write_verify_cache(cache: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Atomic replace, so a concurrent reader never sees half a file; best effort, since a
    cache that cannot be written only costs a re-hash next time."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "files": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, cache)
    except OSError:
        pass


def verify_once(
    directory: Path, filename: str = CHECKLIST, *, cache: Path | None = None
) -> list[str]:
    """`verify_checklist`, skipping files already verified with the same identity and MD5;
    records the directory's files only when all of them pass. Returns the names hashed."""
    cache = cache or default_verify_cache()
    entries = _read_verify_cache(cache)
    checklist = read_checklist(directory / filename)
    verified, hashed = {}, []
    for name, expected in checklist.items():
        path = directory / name
        if not path.exists():
            error = MissingShardError if SHARD_RE.match(name) else ChecksumError
            raise error(ERR_MISSING_LISTED.format(path=directory, name=name))
        key = str(path.resolve())
        identity = _file_identity(path)
        if entries.get(key) == {**identity, "md5": expected}:
            continue
        actual = md5_file(path)
        hashed.append(name)
        if actual != expected:
            raise ChecksumError(
                ERR_CHECKSUM.format(path=directory, name=name, expected=expected, actual=actual)
            )
        if _file_identity(path) == identity:  # not rewritten while it was being hashed
            verified[key] = {**identity, "md5": expected}
    if verified:
        _write_verify_cache(cache, {**_read_verify_cache(cache), **verified})
    return hashed


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


def copy_slice(target: Tensor, axis: int | None, offset: int, part: Tensor) -> None:
    """Copy one shard's slice into its place in `target`, converting dtype and device in the
    copy itself, so nothing of the merged size is allocated on the way."""
    if axis is None:
        target.copy_(part)
    else:
        target.narrow(axis, offset, part.shape[axis]).copy_(part)


def merge_shards(
    shards: list[dict[str, Tensor]], dim: int, names: list[str] | None = None
) -> dict[str, Tensor]:
    """Merge model-parallel shards back into one state dict (``dim`` is the model width):
    each split tensor is allocated once and filled slice by slice."""
    names = names or [f"shard {i}" for i in range(len(shards))]
    plan = plan_tensors(names, shards, dim)
    if len(shards) == 1:
        return {key: t.parts[0] for key, t in plan.items()}
    merged = {}
    for key, tensor in plan.items():
        if tensor.axis is None:
            merged[key] = tensor.parts[0]
            continue
        merged[key] = torch.empty(tensor.shape, dtype=tensor.dtype)
        for offset, part in zip(slice_offsets(tensor), tensor.parts, strict=True):
            copy_slice(merged[key], tensor.axis, offset, part)
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


def check_params(params: Any, path: Path) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise ParamsError(ERR_PARAMS_JSON.format(path=path, reason=type(params).__name__))
    for key, value in params.items():
        if key in UNSUPPORTED_PARAMS:
            if value in (False, None):
                continue  # explicitly off: the architecture we implement
            raise ParamsError(
                ERR_PARAM_UNSUPPORTED.format(
                    path=path, key=key, value=value, why=UNSUPPORTED_PARAMS[key]
                )
            )
        if key not in SUPPORTED_PARAMS:
            supported = ", ".join(sorted(SUPPORTED_PARAMS))
            raise ParamsError(ERR_PARAM_UNKNOWN.format(path=path, key=key, supported=supported))
    for key in REQUIRED_PARAMS:
        if key not in params:
            raise ParamsError(ERR_PARAM_REQUIRED.format(path=path, key=key))
    return {k: v for k, v in params.items() if k not in UNSUPPORTED_PARAMS}


def read_params(directory: Path) -> dict[str, Any]:
    path = directory / PARAMS
    if not path.exists():
        raise CheckpointError(ERR_NO_PARAMS.format(path=directory))
    try:
        params = json.loads(path.read_text())
    except ValueError as exc:
        raise ParamsError(ERR_PARAMS_JSON.format(path=directory, reason=exc)) from exc
    return check_params(params, directory)


def _verify(directory: Path, verify: bool, cache: Path | None) -> None:
    if verify and (directory / CHECKLIST).exists():
        verify_once(directory, cache=cache)


def load_state_dict(
    directory: str | Path,
    *,
    verify: bool = True,
    max_seq_len: int = 2048,
    verify_cache: Path | None = None,
) -> tuple[ModelArgs, dict[str, Tensor]]:
    directory = Path(directory)
    params = read_params(directory)
    paths = shard_paths(directory)
    _verify(directory, verify, verify_cache)
    names = [p.name for p in paths]
    state_dict = merge_shards([load_shard(p) for p in paths], params["dim"], names)
    if params.get("vocab_size", -1) <= 0:  # LLaMA 1 leaves it to the tokenizer
        params = {**params, "vocab_size": state_dict["tok_embeddings.weight"].shape[0]}
    return ModelArgs.from_params(params, max_seq_len=max_seq_len), state_dict


def check_state_dict(model: Transformer, state_dict: dict[str, Any]) -> None:
    """Keys and shapes against the model; values may be tensors or `ShardedTensor` plans."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(ERR_KEYS.format(missing=missing, unexpected=unexpected))
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
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
    verify_cache: Path | None = None,
) -> Transformer:
    """Build on the meta device, allocate every weight once on `device` in `dtype`, and fill
    it from one memory-mapped shard at a time: host memory peaks near the model in `dtype`
    plus one shard's mapped pages (CPU), or those pages alone (CUDA); no whole-tensor
    concatenation or dtype-cast copy is ever made."""
    directory = Path(directory)
    checkpoint = open_checkpoint(
        directory, verify=verify, max_seq_len=max_seq_len, verify_cache=verify_cache
    )
    with torch.device("meta"):
        model = Transformer(checkpoint.args)
    check_state_dict(model, checkpoint.tensors)
    slices, kinds = {}, {}
    for key, tensor in checkpoint.tensors.items():
        shapes = [tuple(p.shape) for p in tensor.parts]
        slices[key] = (tensor.axis, slice_offsets(tensor), shapes)
        kinds[key] = (tensor.shape, dtype if tensor.dtype.is_floating_point else tensor.dtype)
    del checkpoint, tensor  # unmaps every shard; each is mapped again below, alone
    targets = {
        key: torch.empty(shape, dtype=kind, device=device) for key, (shape, kind) in kinds.items()
    }
    for index, path in enumerate(shard_paths(directory)):
        shard = load_shard(path)
        for key, (axis, offsets, shapes) in slices.items():
            part = shard.get(key)
            if part is None or tuple(part.shape) != shapes[index]:  # rewritten meanwhile
                got = None if part is None else tuple(part.shape)
                raise ShapeMismatchError(
                    ERR_SHARD_SHAPE.format(key=key, shapes=[got, shapes[index]])
                )
            if axis is not None or index == 0:  # replicated tensors come from shard 0
                copy_slice(targets[key], axis, offsets[index], part)
        del shard, part  # unmap this shard before the next one's pages come in
    model.load_state_dict(targets, assign=True)
    return model.eval().requires_grad_(False)


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
class StreamingCheckpoint:
    """A Meta-layout checkpoint opened without reading its tensors into memory."""

    args: ModelArgs
    params: dict[str, Any]
    tensors: dict[str, ShardedTensor]


def open_checkpoint(
    directory: str | Path,
    *,
    verify: bool = True,
    max_seq_len: int = 2048,
    verify_cache: Path | None = None,
) -> StreamingCheckpoint:
    """Open every shard memory-mapped and check that the slices fit together; reads no tensor
    data (beyond `verify`'s MD5 pass over files not verified before)."""
    directory = Path(directory)
    params = read_params(directory)
    paths = shard_paths(directory)
    _verify(directory, verify, verify_cache)
    shards = [load_shard(p) for p in paths]
    tensors = plan_tensors([p.name for p in paths], shards, params["dim"])
    if params.get("vocab_size", -1) <= 0:  # LLaMA 1 leaves it to the tokenizer
        params = {**params, "vocab_size": tensors["tok_embeddings.weight"].shape[0]}
    args = ModelArgs.from_params(params, max_seq_len=max_seq_len)
    return StreamingCheckpoint(args=args, params=params, tensors=tensors)
