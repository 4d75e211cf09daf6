"""Whose copy is this: score suspect weights against every grant's fingerprint.

1. The release's marks (``release_marks``): in each fingerprinted tensor of the original
   (bf16/fp16), the marked positions (``keys.marked``) whose value could move one ulp
   either way, with the original value and its ulp there. Computed once per release.
2. The suspect (``open_suspect``), in any layout, read as float32 blocks of the merged Meta
   coordinates: a whole Meta release (shards merged by ``inference_demo.llama.checkpoint``'s
   rules), one or some of its shards (each placed by the model-parallel split rules, its
   index taken from the best match against the original), transformers safetensors (names
   mapped back, q/k rows un-permuted through ``convert.permute_rotary``), any float dtype.
3. At each marked position, ``d = suspect - original``. A candidate's score is
   ``S = sum(w * s) / sqrt(sum(w**2))``, ``s`` its directions (+1/-1) and ``w`` a weight
   computed from ``d`` and the original alone: ``w = ulp * clip(d, +-CLIP * r) / r**2``, with
   ``r`` a robust noise scale of ``d`` in that tensor (1.4826 * median |d|, at least the
   tensor's median ulp). That is the
   matched filter (signal ``+-ulp`` in noise of scale ``r``), clipped so a few wild values
   cannot dominate.
4. For an innocent candidate the ``s`` are fair coins independent of ``w`` (a keyed PRF of
   a code the suspect never saw), so by Hoeffding's inequality for weighted Rademacher sums
   ``P(S >= t) <= exp(-t**2 / 2)``: the innocent-match probability is computed, not
   estimated. It is multiplied by the number of candidates (Bonferroni) before it is
   compared with ``THRESHOLD``; the normal approximation is reported beside it.

Many candidates on a large model: all of them are scored on a screening subset of
positions, and the ``confirm_top`` best are scored again on positions disjoint from it, so
that their final score is independent of how they were picked and the bound still holds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from inference_demo.convert import hf_name, permute_rotary, rotary_heads
from inference_demo.llama.checkpoint import (
    SHARD_RE,
    CheckpointError,
    ShardedTensor,
    copy_slice,
    load_shard,
    open_checkpoint,
    plan_tensors,
    slice_offsets,
)
from inference_demo.llama.model import ModelArgs

from .keys import DENSITY_LOG2, directions, is_fingerprinted
from .perturb import (
    MAGNITUDE,
    BitFormat,
    bit_format,
    bits_to_float32,
    marked_positions,
    tensor_bits,
)

METHOD = "fingerprint-trace/1"
# A corrected innocent-match probability below this names the candidate.
THRESHOLD = 1e-9
SCREEN_POSITIONS = 1 << 20
CONFIRM_TOP = 10
CONFIRM_POSITIONS = 1 << 25
CLIP = 4.0
# Farther than this (RMS of suspect - original over RMS of the original) is not a copy.
DERIVED_MAX_REL_RMS = 1.0
# Changed at fewer than this share of marked positions: the original itself.
UNCHANGED_MAX_SHARE = 1e-4
MAD_TO_SIGMA = 1.4826
MATCH_SAMPLE = 20_000
SCALE_SAMPLE = 200_000
TOP_IN_EVIDENCE = 10
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

ERR_NO_PATH = "{path}: no such file or directory"
ERR_NOT_WEIGHTS = "{path}: not a weight file (expected {suffixes})"
ERR_EMPTY_DIR = "{path}: no weight files (*.pth, *.bin, *.safetensors) in this directory"
ERR_NO_PATHS = "no suspect files given"
ERR_NO_CANDIDATES = "no candidates to score"
ERR_UNREADABLE = "{path}: cannot read it as weights ({reason})"
ERR_ORIGINAL = "{path}: cannot read the original release ({reason})"
ERR_NOT_FINGERPRINTABLE = (
    "{path}: no bf16/fp16 weight matrix in the original release, so it carries no marks"
)
ERR_SHARDS = "{path}: its shards do not fit together ({reason}); pass them one by one"
ERR_MARKS_MISMATCH = "the release marks given were computed for another release or key"


class TraceError(Exception):
    """Bad input to the tracer; the message names the file and what is wrong."""


# The release: where the marks are, and what the original holds there.


@dataclass(frozen=True)
class TensorMarks:
    name: str
    shape: tuple[int, int]
    index: np.ndarray  # flat merged indices, ascending (int64)
    original: np.ndarray  # the original value at each (float32)
    ulp: np.ndarray  # one unit in the last place of that value (float32)


@dataclass(frozen=True)
class ReleaseMarks:
    directory: Path
    args: ModelArgs
    shapes: dict[str, tuple[int, ...]]  # every tensor of the release, merged
    tensors: dict[str, TensorMarks]  # the fingerprinted ones
    files: list[dict[str, Any]]
    key_id: str

    @property
    def n_positions(self) -> int:
        return sum(len(t.index) for t in self.tensors.values())

    def summary(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "key_id": self.key_id,
            "files": self.files,
            "fingerprinted_tensors": len(self.tensors),
            "marked_positions": self.n_positions,
            "density": 2.0**-DENSITY_LOG2,
        }


def key_id(release_key: bytes) -> str:
    """Names the release key in evidence without revealing it."""
    return hmac.new(release_key, b"key-id", hashlib.sha256).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _file_entry(path: Path, root: Path | None = None) -> dict[str, Any]:
    name = str(path.relative_to(root)) if root else str(path)
    return {"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def merge_tensor(tensor: ShardedTensor, dtype: torch.dtype | None = None) -> Tensor:
    """One merged tensor, its slices copied into place as the checkpoint loader does."""
    if len(tensor.parts) == 1 or tensor.axis is None:
        part = tensor.parts[0]
        return part if dtype is None else part.to(dtype)
    out = torch.empty(tensor.shape, dtype=dtype or tensor.dtype)
    for offset, part in zip(slice_offsets(tensor), tensor.parts, strict=True):
        copy_slice(out, tensor.axis, offset, part)
    return out


def both_ways(bits: np.ndarray, fmt: BitFormat) -> np.ndarray:
    """Values that can move one ulp up and down and stay normal and finite: for these the
    recipient's direction alone decides the change."""
    magnitude = bits & MAGNITUDE
    exponent = magnitude & fmt.exponent_mask
    ok = (exponent != 0) & (exponent != fmt.exponent_mask)
    return ok & (magnitude != fmt.largest) & (magnitude != fmt.smallest)


def ulp_of(bits: np.ndarray, fmt: BitFormat) -> np.ndarray:
    magnitude = bits & MAGNITUDE
    return bits_to_float32(magnitude + np.uint16(1), fmt) - bits_to_float32(magnitude, fmt)


def tensor_marks(name: str, tensor: Tensor, release_key: bytes) -> TensorMarks | None:
    fmt = bit_format(tensor.dtype)
    if fmt is None or not is_fingerprinted(name, tuple(tensor.shape)):
        return None
    rows, cols = tensor.shape
    bits = tensor_bits(tensor)
    index, original, ulp = [], [], []
    for local in marked_positions(release_key, name, len(bits)):
        here = bits[local]
        keep = both_ways(here, fmt)
        index.append(local[keep].astype(np.int64))
        original.append(bits_to_float32(here[keep], fmt))
        ulp.append(ulp_of(here[keep], fmt))
    return TensorMarks(
        name, (rows, cols), np.concatenate(index), np.concatenate(original), np.concatenate(ulp)
    )


def release_marks(original_dir: str | Path, release_key: bytes) -> ReleaseMarks:
    """The marks of a release, from its original (published) Meta-layout files."""
    directory = Path(original_dir)
    try:
        checkpoint = open_checkpoint(directory, verify=False)
    except (CheckpointError, OSError) as exc:
        raise TraceError(ERR_ORIGINAL.format(path=directory, reason=exc)) from None
    tensors = {}
    for key, sharded in checkpoint.tensors.items():
        if bit_format(sharded.dtype) and is_fingerprinted(key, sharded.shape):
            marks = tensor_marks(key, merge_tensor(sharded), release_key)
            if marks is not None:
                tensors[key] = marks
    if not tensors:
        raise TraceError(ERR_NOT_FINGERPRINTABLE.format(path=directory))
    files = [_file_entry(p, directory) for p in sorted(directory.iterdir()) if p.is_file()]
    return ReleaseMarks(
        directory=directory,
        args=checkpoint.args,
        shapes={k: tuple(t.shape) for k, t in checkpoint.tensors.items()},
        tensors=tensors,
        files=files,
        key_id=key_id(release_key),
    )


# The suspect: float32 blocks of the merged coordinates.


@dataclass(frozen=True)
class Block:
    """A rectangle of one merged 2-D tensor, held by the suspect, as float32."""

    tensor: str
    row0: int
    col0: int
    values: np.ndarray  # (rows, cols) float32
    source: str

    @property
    def extent(self) -> tuple[int, int, int, int]:
        rows, cols = self.values.shape
        return self.row0, self.row0 + rows, self.col0, self.col0 + cols


@dataclass
class SuspectFile:
    path: str
    size: int
    sha256: str
    layout: str  # "meta" (a complete set of shards), "meta-shard", "transformers", "state"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suspect:
    files: list[SuspectFile]
    blocks: Callable[[], Iterator[Block]]
    notes: list[str] = field(default_factory=list)


def _as_float32(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).contiguous().numpy()


def _weight_files(paths: Iterable[str | Path]) -> list[Path]:
    """The weight files named or in the directories named, each once. A file is known by the
    name it was given: the Hugging Face cache links ``model.safetensors`` to a blob named by
    its hash, with no suffix to go by."""
    found: dict[Path, Path] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():  # a leak is often a tree (LLaMA/7B/consolidated.00.pth, ...)
            files = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in WEIGHT_SUFFIXES and p.is_file() and not _hidden(p, path)
            )
            if not files:
                raise TraceError(ERR_EMPTY_DIR.format(path=path))
        elif path.is_file():
            if path.suffix not in WEIGHT_SUFFIXES:
                raise TraceError(
                    ERR_NOT_WEIGHTS.format(path=path, suffixes=", ".join(WEIGHT_SUFFIXES))
                )
            files = [path]
        else:
            raise TraceError(ERR_NO_PATH.format(path=path))
        for f in files:
            found.setdefault(f.resolve(), f.absolute())
    if not found:
        raise TraceError(ERR_NO_PATHS)
    return list(found.values())


def _hidden(path: Path, root: Path) -> bool:
    """Inside a dot folder under ``root`` (the HF cache's .cache, a download's .part files)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


class _SafetensorsFile(Mapping[str, Tensor]):
    """A safetensors file's tensors, each read when asked for (the header says what is in it)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._names = list(self._file.keys())  # noqa: SIM118 (not a dict)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """From the header: no tensor is read."""
        return tuple(self._file.get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _read_tensors(path: Path) -> Mapping[str, Tensor]:
    """A file's tensors, memory-mapped or read one by one when used; no code from it is run."""
    try:
        if path.suffix == ".safetensors":
            return _SafetensorsFile(path)
        return load_shard(path)
    except CheckpointError as exc:
        raise TraceError(str(exc)) from None
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise TraceError(ERR_UNREADABLE.format(path=path, reason=exc)) from None


def unpermute_rotary(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of the converter's ``permute_rotary``, derived from it: HF row ``j`` holds
    Meta row ``order[j]``."""
    rows = w.shape[0]
    order = permute_rotary(torch.arange(rows).view(rows, 1), n_heads).view(-1)
    out = torch.empty_like(w)
    out[order] = w
    return out


def _meta_names(release: ReleaseMarks) -> dict[str, str]:
    names = {}
    for key in release.shapes:
        try:
            names[hf_name(key)] = key
        except (KeyError, ValueError):
            continue
    return names


def _complete_meta_set(files: list[Path], kinds: dict[Path, str]) -> list[list[Path]]:
    """Groups of Meta-named shard files that form a whole release (00 .. NN-1, one folder)."""
    by_dir: dict[Path, dict[int, Path]] = {}
    for f in files:
        if kinds[f] == "meta" and (m := SHARD_RE.match(f.name)):
            by_dir.setdefault(f.parent, {})[int(m.group(1))] = f
    return [
        [shards[i] for i in range(len(shards))]
        for shards in by_dir.values()
        if sorted(shards) == list(range(len(shards)))
    ]


def _slice_place(shape: tuple[int, ...], merged: tuple[int, ...]) -> tuple[int, int] | None:
    """(axis, parts) when ``shape`` is one of ``parts`` equal slices of ``merged``."""
    if len(shape) != len(merged):
        return None
    differ = [i for i, (a, b) in enumerate(zip(shape, merged, strict=True)) if a != b]
    if len(differ) != 1 or merged[differ[0]] % shape[differ[0]]:
        return None
    return differ[0], merged[differ[0]] // shape[differ[0]]


def _region(marks: TensorMarks, block_extent: tuple[int, int, int, int]) -> np.ndarray | None:
    """Positions of ``marks`` inside a block (indices into the marks); None for all."""
    r0, r1, c0, c1 = block_extent
    rows, cols = marks.shape
    if (r0, r1, c0, c1) == (0, rows, 0, cols):
        return None
    if c0 == 0 and c1 == cols:
        lo, hi = np.searchsorted(marks.index, [r0 * cols, r1 * cols])
        return np.arange(lo, hi)
    r, c = np.divmod(marks.index, cols)
    return np.flatnonzero((r >= r0) & (r < r1) & (c >= c0) & (c < c1))


def _local(marks: TensorMarks, sel: np.ndarray | None, block: Block) -> np.ndarray:
    index = marks.index if sel is None else marks.index[sel]
    if sel is None:
        return index
    cols = marks.shape[1]
    r, c = np.divmod(index, cols)
    return (r - block.row0) * block.values.shape[1] + (c - block.col0)


def _best_shard(
    release: ReleaseMarks, tensors: Mapping[str, Tensor], parts: int, by_name: int | None
) -> tuple[int, str]:
    """Which of ``parts`` slices a lone shard file holds: the one its values match best."""
    for key, t in tensors.items():
        marks = release.tensors.get(key)
        place = _slice_place(tuple(t.shape), release.shapes.get(key, ()))
        if marks is None or place is None or place[1] != parts:
            continue
        values = _as_float32(t)
        axis, size = place[0], t.shape[place[0]]
        errors = []
        for k in range(parts):
            row0, col0 = (k * size, 0) if axis == 0 else (0, k * size)
            block = Block(key, row0, col0, values, "")
            sel = _region(marks, block.extent)
            sel = sel[:: max(1, len(sel) // MATCH_SAMPLE)]
            local = _local(marks, sel, block)
            d = values.reshape(-1)[local] - marks.original[sel]
            errors.append(float(np.median(np.abs(d))) if len(d) else math.inf)
        best = min(range(parts), key=lambda k: (errors[k], k != by_name))
        return best, "name" if best == by_name else "best match"
    return (by_name if by_name is not None and by_name < parts else 0), "name"


def _meta_blocks(
    release: ReleaseMarks, path: Path, tensors: Mapping[str, Tensor], info: SuspectFile
) -> Iterator[Block]:
    """Blocks of one Meta-named file: whole tensors, or its slice of each split one."""
    m = SHARD_RE.match(path.name)
    by_name = int(m.group(1)) if m else None
    shard: tuple[int, str] | None = None
    for key, t in tensors.items():
        if key not in release.tensors:
            continue
        merged = release.shapes[key]
        if tuple(t.shape) == merged:
            yield Block(key, 0, 0, _as_float32(t), path.name)
            continue
        place = _slice_place(tuple(t.shape), merged)
        if place is None:
            info.detail.setdefault("shape_mismatch", []).append(key)
            continue
        axis, parts = place
        if shard is None:
            shard = _best_shard(release, tensors, parts, by_name)
            info.detail.update(shard_index=shard[0], shard_of=parts, shard_index_by=shard[1])
        offset = shard[0] * t.shape[axis]
        row0, col0 = (offset, 0) if axis == 0 else (0, offset)
        yield Block(key, row0, col0, _as_float32(t), path.name)
    info.layout = "meta" if shard is None else "meta-shard"


def _merged_blocks(release: ReleaseMarks, paths: list[Path]) -> Iterator[Block]:
    shards = [_read_tensors(p) for p in paths]
    try:
        plan = plan_tensors([p.name for p in paths], shards, release.args.dim)
    except CheckpointError as exc:
        raise TraceError(ERR_SHARDS.format(path=paths[0].parent, reason=exc)) from None
    for key, sharded in plan.items():
        if key in release.tensors and sharded.shape == release.shapes[key]:
            yield Block(key, 0, 0, merge_tensor(sharded, torch.float32).numpy(), "merged")


def _hf_blocks(
    release: ReleaseMarks, path: Path, tensors: Mapping[str, Tensor], info: SuspectFile
) -> Iterator[Block]:
    names = _meta_names(release)
    for stored, t in tensors.items():
        key = names.get(stored)
        if key is None or key not in release.tensors:
            continue
        if tuple(t.shape) != release.shapes[key]:
            info.detail.setdefault("shape_mismatch", []).append(stored)
            continue
        heads = rotary_heads(release.args, key)
        t = unpermute_rotary(t, heads) if heads else t
        yield Block(key, 0, 0, _as_float32(t), path.name)


def _shapes(tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    if isinstance(tensors, _SafetensorsFile):
        return {name: tensors.shape(name) for name in tensors}
    return {name: tuple(t.shape) for name, t in tensors.items()}


def _fits(shape: tuple[int, ...], merged: tuple[int, ...] | None) -> bool:
    """Whether a tensor of ``shape`` can be the release's (whole, or one shard's slice)."""
    return merged is not None and (shape == merged or _slice_place(shape, merged) is not None)


def _kind(tensors: Mapping[str, Tensor], release: ReleaseMarks) -> str:
    """Which naming a file's tensors use, counting only those whose shapes fit the release:
    a file of another model in the same tree (13B beside 7B) is "unknown", left out."""
    names = _meta_names(release)
    shapes = _shapes(tensors)
    meta = sum(_fits(shape, release.shapes.get(k)) for k, shape in shapes.items())
    hf = sum(k in names and _fits(shape, release.shapes[names[k]]) for k, shape in shapes.items())
    if not meta and not hf:
        return "unknown"
    return "meta" if meta >= hf else "transformers"


def open_suspect(paths: Iterable[str | Path], release: ReleaseMarks) -> Suspect:
    """Find and fingerprint (SHA-256) the suspect's weight files; their tensors are read
    only when ``blocks()`` is iterated, one file at a time."""
    files = _weight_files(paths)
    kinds, infos = {}, {}
    for f in files:
        tensors = _read_tensors(f)
        kinds[f] = _kind(tensors, release)
        infos[f] = SuspectFile(str(f), f.stat().st_size, sha256_file(f), kinds[f])
        del tensors
    groups = _complete_meta_set(files, kinds) if len(files) > 1 else []
    grouped = {p for group in groups for p in group}
    notes = [f"{f}: no tensor of this release in it" for f in files if kinds[f] == "unknown"]

    def blocks() -> Iterator[Block]:
        for group in groups:
            for p in group:
                infos[p].layout = "meta"
                infos[p].detail.update(merged_with=[q.name for q in group])
            yield from _merged_blocks(release, group)
        for f in files:
            if f in grouped or kinds[f] == "unknown":
                continue
            tensors = _read_tensors(f)
            if kinds[f] == "transformers":
                yield from _hf_blocks(release, f, tensors, infos[f])
            else:
                yield from _meta_blocks(release, f, tensors, infos[f])
            del tensors

    return Suspect([infos[f] for f in files], blocks, notes)


def state_dict_suspect(state: dict[str, Tensor], release: ReleaseMarks, label: str) -> Suspect:
    """A suspect already in memory as merged Meta-named tensors (tests, the bench)."""

    def blocks() -> Iterator[Block]:
        for key, t in state.items():
            if key in release.tensors and tuple(t.shape) == release.shapes[key]:
                yield Block(key, 0, 0, _as_float32(t), label)

    return Suspect([SuspectFile(label, 0, "", "state")], blocks)


# Evidence: weights from d, scores from directions.


@dataclass
class Rows:
    """Scored positions of one tensor: merged indices and their weights."""

    tensor: str
    index: np.ndarray
    weight: np.ndarray


@dataclass
class Closeness:
    positions: int = 0
    changed: int = 0
    sum_d2: float = 0.0
    sum_x2: float = 0.0
    rel_sample: list[np.ndarray] = field(default_factory=list)

    def add(self, d: np.ndarray, x: np.ndarray) -> None:
        self.positions += len(d)
        self.changed += int(np.count_nonzero(d))
        self.sum_d2 += float(np.dot(d, d))
        self.sum_x2 += float(np.dot(x, x))
        step = max(1, len(d) // 4096)
        self.rel_sample.append(np.abs(d[::step]) / np.abs(x[::step]))

    def summary(self) -> dict[str, Any]:
        rel = np.concatenate(self.rel_sample) if self.rel_sample else np.zeros(0)
        return {
            "positions": self.positions,
            "changed_share": self.changed / self.positions if self.positions else 0.0,
            "relative_rms_difference": math.sqrt(self.sum_d2 / self.sum_x2)
            if self.sum_x2
            else None,
            "median_relative_difference": float(np.median(rel)) if len(rel) else None,
        }


def noise_scale(d: np.ndarray, ulp: np.ndarray) -> float:
    """The noise around the +-ulp signal in one tensor: 1.4826 * median |d| (the MAD, so a
    few wild values do not inflate it), but never below the tensor's median ulp: with no
    noise (a copy, a cast, colluders' rounded average) the MAD says nothing useful, and
    the tensors must not be weighted by its accidents."""
    if not len(d):
        return 0.0
    step = max(1, len(d) // SCALE_SAMPLE)
    mad = MAD_TO_SIGMA * float(np.median(np.abs(d[::step])))
    return max(mad, float(np.median(ulp[::step])))


def weights(d: np.ndarray, ulp: np.ndarray, clip: float = CLIP) -> np.ndarray:
    """The matched filter, from ``d`` and the original alone (so the bound stays valid)."""
    r = noise_scale(d, ulp)
    if r == 0.0:
        return np.zeros(len(d), dtype=np.float32)
    return (ulp * np.clip(d, -clip * r, clip * r) / (r * r)).astype(np.float32)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def collect(
    suspect: Suspect, release: ReleaseMarks, clip: float = CLIP
) -> tuple[list[Rows], Closeness, list[str]]:
    """Each marked position the suspect holds, once, with its weight."""
    rows, closeness, notes = [], Closeness(), []
    seen: dict[str, list[tuple[int, int, int, int]]] = {}
    for block in suspect.blocks():
        marks = release.tensors[block.tensor]
        if any(_overlaps(block.extent, e) for e in seen.get(block.tensor, [])):
            notes.append(f"{block.source}: {block.tensor} overlaps one read before; ignored")
            continue
        seen.setdefault(block.tensor, []).append(block.extent)
        sel = _region(marks, block.extent)
        local = _local(marks, sel, block)
        x = marks.original if sel is None else marks.original[sel]
        u = marks.ulp if sel is None else marks.ulp[sel]
        d = block.values.reshape(-1)[local].astype(np.float64) - x
        d[~np.isfinite(d)] = 0.0
        closeness.add(d, x.astype(np.float64))
        index = marks.index if sel is None else marks.index[sel]
        rows.append(Rows(block.tensor, index, weights(d, u.astype(np.float64), clip)))
    return rows, closeness, notes


def _stride(total: int, limit: int | None) -> int:
    """The power of two that thins ``total`` positions to at most about ``limit``."""
    if limit is None or total <= limit:
        return 1
    return 1 << math.ceil(math.log2(total / limit))


def _select(rows: list[Rows], keep: Callable[[np.ndarray], np.ndarray]) -> list[Rows]:
    out = []
    for r in rows:
        pick = keep(r.index)
        out.append(Rows(r.tensor, r.index[pick], r.weight[pick]))
    return out


def _stages(
    rows: list[Rows], total: int, screen: int, confirm: int | None
) -> tuple[list[Rows], list[Rows]]:
    """Screening positions (merged index = 0 mod a power of two ``e``) and confirming ones
    (index = -1 mod another, ``c``): disjoint, as neither residue class meets the other,
    and chosen by position alone, so the same whatever the layout or the reading order."""
    e = _stride(total, screen)
    c = _stride(total - total // e, confirm)
    first = _select(rows, lambda i: (i & (e - 1)) == 0)
    if c == 1:
        return first, _select(rows, lambda i: (i & (e - 1)) != 0)
    return first, _select(rows, lambda i: ((i + 1) & (c - 1)) == 0)


def _thin(rows: list[Rows], total: int, limit: int | None) -> list[Rows]:
    c = _stride(total, limit)
    return rows if c == 1 else _select(rows, lambda i: (i & (c - 1)) == 0)


def scores(rows: list[Rows], codes: list[bytes]) -> np.ndarray:
    """S for each code over ``rows``; 0 where every weight is 0."""
    prepared = [(r.tensor, r.index, r.weight.astype(np.float64)) for r in rows if len(r.index)]
    norm = math.sqrt(sum(float(np.dot(w, w)) for _, _, w in prepared))
    out = np.zeros(len(codes))
    if norm == 0.0:
        return out
    for c, code in enumerate(codes):
        out[c] = sum(_dot(w, directions(code, t, i)) for t, i, w in prepared) / norm
    return out


def _dot(w: np.ndarray, s: np.ndarray) -> float:
    """sum(w * s) for float64 ``w`` and int8 +-1 ``s``, pairwise-summed (BLAS's float64 dot
    of a mixed pair is many times slower here, and float32 would lose precision)."""
    return float(np.multiply(w, s).sum())


def log10_p_bound(score: float) -> float:
    """log10 of exp(-S**2 / 2), the Hoeffding bound on P(innocent S >= score)."""
    return -(score * score) / (2 * math.log(10)) if score > 0 else 0.0


def log10_p_normal(score: float) -> float:
    """log10 of the standard normal upper tail at ``score`` (the CLT approximation)."""
    if score < 30:
        return math.log10(max(0.5 * math.erfc(score / math.sqrt(2)), 1e-320))
    s2 = score * score
    ln = -s2 / 2 - math.log(score) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / s2 + 3 / s2**2)
    return ln / math.log(10)


def _pow10(log10: float) -> float:
    return 10.0**log10 if log10 > -320 else 0.0


@dataclass(frozen=True)
class CandidateScore:
    label: str
    score: float
    positions: int
    stage: str  # "all", "screen" or "confirm"
    n_candidates: int
    screen_score: float | None = None

    @property
    def log10_p_bound(self) -> float:
        return log10_p_bound(self.score)

    @property
    def log10_p_corrected(self) -> float:
        return min(0.0, self.log10_p_bound + math.log10(self.n_candidates))

    @property
    def p_bound(self) -> float:
        return _pow10(self.log10_p_bound)

    @property
    def p_corrected(self) -> float:
        return _pow10(self.log10_p_corrected)

    @property
    def p_normal(self) -> float:
        return _pow10(log10_p_normal(self.score))

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": round(self.score, 4),
            "p_bound": self.p_bound,
            "log10_p_bound": round(self.log10_p_bound, 3),
            "p_bound_corrected": self.p_corrected,
            "log10_p_bound_corrected": round(self.log10_p_corrected, 3),
            "p_normal": self.p_normal,
            "log10_p_normal": round(log10_p_normal(self.score), 3),
            "positions": self.positions,
            "stage": self.stage,
            "screen_score": None if self.screen_score is None else round(self.screen_score, 4),
        }


@dataclass
class TraceResult:
    verdict: str  # "recipient" or "no recipient"
    reason: str
    named: list[str]
    candidates: list[CandidateScore]  # best first
    threshold: float
    positions: dict[str, int]
    closeness: dict[str, Any]
    suspect_files: list[SuspectFile]
    release: dict[str, Any]
    parameters: dict[str, Any]
    notes: list[str]
    started_at: str
    elapsed_s: float

    @property
    def derived(self) -> bool:
        rel = self.closeness["relative_rms_difference"]
        return rel is not None and rel <= DERIVED_MAX_REL_RMS

    def candidate(self, label: str) -> CandidateScore:
        return next(c for c in self.candidates if c.label == label)

    def rank(self, label: str) -> int:
        """1 for the best-scoring candidate."""
        return 1 + [c.label for c in self.candidates].index(label)


def _verdict(named: list[str], closeness: dict[str, Any], tensors_used: int) -> tuple[str, str]:
    if named:
        return "recipient", f"{len(named)} candidate(s) below the threshold"
    if not tensors_used or closeness["relative_rms_difference"] is None:
        return "no recipient", (
            "not derived from this release: no fingerprinted tensor of it is in the files"
        )
    if closeness["relative_rms_difference"] > DERIVED_MAX_REL_RMS:
        return "no recipient", (
            "not derived from this release: its weights are farther from the original's "
            "than the original is from zero"
        )
    if closeness["changed_share"] < UNCHANGED_MAX_SHARE:
        return "no recipient", (
            "identical to the original at the marked positions: an unfingerprinted copy"
        )
    return "no recipient", (
        "derived from this release, but no candidate's fingerprint is significant"
    )


def trace_suspect(
    suspect: Suspect,
    release: ReleaseMarks,
    candidates: dict[str, bytes],
    *,
    threshold: float = THRESHOLD,
    screen_positions: int = SCREEN_POSITIONS,
    confirm_top: int = CONFIRM_TOP,
    confirm_positions: int | None = CONFIRM_POSITIONS,
    clip: float = CLIP,
) -> TraceResult:
    if not candidates:
        raise TraceError(ERR_NO_CANDIDATES)
    started, clock = datetime.now(UTC), _clock()
    rows, closeness, notes = collect(suspect, release, clip)
    labels, codes = list(candidates), list(candidates.values())
    n, total = len(codes), sum(len(r.index) for r in rows)
    results: dict[str, CandidateScore] = {}
    screen_n = confirm_n = 0
    if total <= screen_positions or n <= confirm_top:
        scored = _thin(rows, total, confirm_positions)
        confirm_n = sum(len(r.index) for r in scored)
        for label, s in zip(labels, scores(scored, codes), strict=True):
            results[label] = CandidateScore(label, float(s), confirm_n, "all", n)
    else:
        screen, confirm = _stages(rows, total, screen_positions, confirm_positions)
        screen_n = sum(len(r.index) for r in screen)
        confirm_n = sum(len(r.index) for r in confirm)
        first = scores(screen, codes)
        top = [int(i) for i in np.argsort(-first, kind="stable")[:confirm_top]]
        second = scores(confirm, [codes[i] for i in top])
        for label, s in zip(labels, first, strict=True):
            results[label] = CandidateScore(label, float(s), screen_n, "screen", n)
        for i, s in zip(top, second, strict=True):
            results[labels[i]] = CandidateScore(
                labels[i], float(s), confirm_n, "confirm", n, screen_score=float(first[i])
            )
    ranked = sorted(results.values(), key=lambda c: (c.log10_p_bound, c.label))
    named = [c.label for c in ranked if c.log10_p_corrected < math.log10(threshold)]
    summary = closeness.summary()
    tensors_used = len({r.tensor for r in rows})
    verdict, reason = _verdict(named, summary, tensors_used)
    return TraceResult(
        verdict=verdict,
        reason=reason,
        named=named,
        candidates=ranked,
        threshold=threshold,
        positions={
            "marked_in_release": release.n_positions,
            "held_by_suspect": total,
            "screen": screen_n,
            "confirm": confirm_n,
            "tensors_used": tensors_used,
            "tensors_in_release": len(release.tensors),
        },
        closeness=summary,
        suspect_files=suspect.files,
        release=release.summary(),
        parameters={
            "threshold": threshold,
            "correction": "bonferroni",
            "screen_positions": screen_positions,
            "confirm_top": confirm_top,
            "confirm_positions": confirm_positions,
            "clip": clip,
        },
        notes=suspect.notes + notes,
        started_at=started.isoformat(),
        elapsed_s=round(clock(), 3),
    )


def _clock() -> Callable[[], float]:
    import time

    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def trace(
    suspect_paths: Iterable[str | Path],
    original_dir: str | Path,
    release_key: bytes,
    candidates: dict[str, bytes],
    *,
    marks: ReleaseMarks | None = None,
    **options: Any,
) -> TraceResult:
    """Score every candidate's fingerprint in the suspect files against the original
    release. ``marks`` (from ``release_marks``) spares recomputing them for each suspect.
    Options: threshold, screen_positions, confirm_top, confirm_positions, clip."""
    if marks is None:
        marks = release_marks(original_dir, release_key)
    elif marks.key_id != key_id(release_key) or (
        marks.directory.resolve() != Path(original_dir).resolve()
    ):
        raise TraceError(ERR_MARKS_MISMATCH)
    return trace_suspect(open_suspect(suspect_paths, marks), marks, candidates, **options)


def evidence_json(result: TraceResult) -> dict[str, Any]:
    """Everything an operator keeps, JSON-able and ready to be signed: the files examined,
    the release, the method and its parameters, the scores. No secret is in it."""
    return {
        "method": METHOD,
        "statistic": (
            "S = sum(w_i * s_i) / sqrt(sum(w_i^2)) over marked positions i; s_i = the "
            "candidate's direction (+1/-1), w_i = ulp_i * clip(d_i, +-clip*r) / r^2, "
            "d_i = suspect_i - original_i, r = max(1.4826 * median|d|, median ulp) per tensor"
        ),
        "probability": (
            "p_bound = exp(-S^2/2) (Hoeffding, weighted Rademacher sum: an innocent "
            "candidate's directions are fair coins independent of w); corrected = "
            "min(1, p_bound * candidates scored) (Bonferroni)"
        ),
        "verdict": result.verdict,
        "reason": result.reason,
        "named": result.named,
        "threshold": result.threshold,
        "candidates_scored": len(result.candidates),
        "top": [c.as_dict() for c in result.candidates[:TOP_IN_EVIDENCE]],
        "positions": result.positions,
        "closeness": result.closeness,
        "suspect": {
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256, "layout": f.layout, **f.detail}
                for f in result.suspect_files
            ]
        },
        "release": result.release,
        "parameters": result.parameters,
        "notes": result.notes,
        "timestamp": result.started_at,
        "elapsed_s": result.elapsed_s,
    }


def dumps(evidence: dict[str, Any]) -> str:
    """Canonical JSON (sorted keys, no spaces), the bytes a signature covers."""
    return json.dumps(evidence, sort_keys=True, separators=(",", ":"), allow_nan=False)
