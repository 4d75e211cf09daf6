"""Where each tensor's bytes lie inside a weight file, and where its elements lie in the
merged coordinates of ``keys`` (Meta name, flat index in the merged, unpermuted tensor).

Two formats, both parsed from their headers without executing anything from the file:

- Meta's ``consolidated.NN.pth``: torch's zip archive. Every entry must be *stored* (torch
  writes them so; a compressed one cannot be changed in place). ``data.pkl`` is read by an
  unpickler that only knows how to describe tensors, and each storage ``<archive>/data/<key>``
  is found from its zip local header. Shard ``s`` of ``S`` holds a slice of each split tensor,
  on the axis LLaMA's loader merges it on (``inference_demo.llama.shards``'s rules).
- transformers safetensors (``inference_demo.convert``'s output): the JSON header gives the
  offsets; names map back to Meta's, and q/k rows back through the converter's permutation
  (``inference_demo.hf_layout``).

Neither torch nor anything that imports it: the web process serves fingerprinted copies.
"""

from __future__ import annotations

import bisect
import collections
import functools
import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

# Torch-free rule modules: the web process computes fingerprinted copies (DESIGN decision 6).
from inference_demo.hf_layout import LAYER_NAMES, TOP_NAMES, rotary_heads, rotary_rows
from inference_demo.llama.shards import (
    IGNORED,
    PARAMS,
    SHARD_RE,
    CheckpointError,
    plan_tensors,
    shard_paths,
    slice_offsets,
)

from .keys import is_fingerprinted

# One unit in the last place is defined for these (the bf16/fp16 weights).
ULP_DTYPES = ("bfloat16", "float16")
ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
TORCH_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "Float8_e4m3fnStorage": "float8_e4m3fn",
    "Float8_e5m2Storage": "float8_e5m2",
}
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
CONFIG = "config.json"
SAFETENSORS_SUFFIX = ".safetensors"
# Meta names from transformers ones: the converter's tables, inverted.
META_TOP = {hf: meta for meta, hf in TOP_NAMES.items()}
META_MODULES = {hf: meta for meta, hf in LAYER_NAMES.items()}
MAX_SAFETENSORS_HEADER = 100 << 20

ERR_COMPRESSED = (
    "{path}: zip entry {entry} is compressed ({method}); torch saves weights as stored "
    "entries, and only stored entries can be fingerprinted in place"
)
ERR_NOT_ZIP = "{path}: not a torch zip archive ({reason})"
ERR_NO_PICKLE = "{path}: no <archive>/data.pkl entry, not a torch zip archive"
ERR_BYTEORDER = "{path}: tensors are stored {order}-endian; only little-endian is supported"
ERR_PICKLE = "{path}: data.pkl is not a plain dict of tensors ({reason})"
ERR_STORAGE = "{path}: tensor {name} refers to storage {key}, which has no entry data/{key}"
ERR_BOUNDS = "{path}: tensor {name} ({start}..{end}) lies outside its storage or the file"
ERR_DTYPE = "{path}: tensor {name} has unknown dtype {dtype}"
ERR_SAFETENSORS = "{path}: not a safetensors file ({reason})"
ERR_SPLIT_RANK = "{name}: a {rank}-D tensor split on axis {axis} cannot be mapped"
ERR_SHARD_INDEX = "{path}: shard index {index} is not in 0..{last}"
ERR_SHARD_NAME = "{path}: not named consolidated.NN.pth; pass shard_index"
ERR_CONFIG = "{path}: config.json lacks num_attention_heads, needed to undo the q/k permutation"
ERR_SHARED = "{path}: tensors {a} and {b} share bytes; a fingerprinted tensor must own its bytes"
ERR_NOT_WEIGHTS = "{name}: not a weight file (consolidated.NN.pth or *.safetensors)"
ERR_NO_WEIGHTS = "{path}: neither params.json with consolidated.NN.pth nor *.safetensors"


class LayoutError(Exception):
    """A weight file whose tensors cannot be located or mapped; the message says which."""


class CompressedEntryError(LayoutError):
    pass


@dataclass(frozen=True)
class RowMap:
    """Local element -> merged flat index, row by row: local row ``r`` (``row_len`` elements)
    is the merged run starting at ``base + row_stride * merged_row(r)``, where merged_row is
    ``r`` or, for permuted rows, ``perm[r]``."""

    row_len: int
    row_stride: int
    base: int = 0
    perm: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def contiguous(self) -> bool:
        """Whether local element ``i`` is merged element ``base + i`` (one run)."""
        return self.perm is None and self.row_stride == self.row_len

    def row_starts(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        merged_rows = rows if self.perm is None else self.perm[rows]
        return (self.base + self.row_stride * merged_rows).astype(np.uint64)

    def merged_index(self, local: np.ndarray) -> np.ndarray:
        local = np.asarray(local, dtype=np.int64)
        if self.contiguous:
            return (local + self.base).astype(np.uint64)
        rows, cols = np.divmod(local, self.row_len)
        return self.row_starts(rows) + cols.astype(np.uint64)


@dataclass(frozen=True)
class TensorExtent:
    """One tensor's data inside a file, and its place in the merged coordinates."""

    name: str  # Meta name of the merged tensor: the coordinate system of ``keys``
    stored_name: str  # its name in this file (a transformers name in safetensors)
    dtype: str  # torch's name: bfloat16, float16, float32, ...
    shape: tuple[int, ...]  # as stored in this file
    merged_shape: tuple[int, ...]
    file_offset: int
    nbytes: int
    contiguous: bool
    rows: RowMap
    mapped: bool = True  # False for a tensor with no Meta counterpart (never fingerprinted)

    @property
    def end(self) -> int:
        return self.file_offset + self.nbytes

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def weight_matrix(self) -> bool:
        """A tensor the fingerprint is meant to mark (whatever its dtype)."""
        return self.mapped and is_fingerprinted(self.name, self.merged_shape)

    @functools.cached_property
    def fingerprinted(self) -> bool:
        return self.weight_matrix and self.dtype in ULP_DTYPES and self.contiguous

    @property
    def skip_reason(self) -> str | None:
        """Why this tensor is served exactly as published; None when it is fingerprinted."""
        if not self.mapped:
            return "no Meta counterpart"
        if not is_fingerprinted(self.name, self.merged_shape):
            return "not a 2-D weight matrix"
        if self.dtype not in ULP_DTYPES:
            return f"{self.dtype}: one ulp is defined for {' and '.join(ULP_DTYPES)} only"
        if not self.contiguous:
            return "not stored contiguously"
        return None

    def merged_index(self, local: np.ndarray) -> np.ndarray:
        """Flat merged indices of these flat local (row-major, in this file) element indices."""
        return self.rows.merged_index(local)


@dataclass(frozen=True)
class FileLayout:
    """A weight file's tensors, in file order; every other byte is header or padding."""

    path: str
    format: str  # "meta" or "safetensors"
    size: int
    extents: tuple[TensorExtent, ...]
    shard_index: int = 0
    n_shards: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", [e.file_offset for e in self.extents])

    @functools.cached_property
    def fingerprinted(self) -> tuple[TensorExtent, ...]:
        return tuple(e for e in self.extents if e.fingerprinted)

    @functools.cached_property
    def unmarkable(self) -> tuple[TensorExtent, ...]:
        """Weight matrices that cannot carry the fingerprint (dtype, or stored out of order)."""
        return tuple(e for e in self.extents if e.weight_matrix and not e.fingerprinted)

    def extent(self, name: str) -> TensorExtent:
        """By Meta name (or, for an unmapped tensor, its stored name)."""
        for e in self.extents:
            if e.name == name:
                return e
        raise KeyError(name)

    def overlapping(self, start: int, end: int) -> list[TensorExtent]:
        """The extents with at least one byte in [start, end)."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)  # type: ignore[attr-defined]
        out = []
        for e in self.extents[i:]:
            if e.file_offset >= end:
                break
            if e.end > start and e.nbytes:
                out.append(e)
        return out


# --- Meta: torch's zip archive -------------------------------------------------------------


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: _Storage, offset: int, size: Any, stride: Any, *_: Any, **__: Any
) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(stride))


def _rebuild_parameter(data: _TensorRef, *_: Any) -> _TensorRef:
    return data


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _DescribingUnpickler(pickle.Unpickler):
    """Knows only the globals torch writes for a dict of tensors, replaced by functions that
    describe the tensor instead of building it: nothing from the file is executed."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in TORCH_STORAGES:
            return _StorageType(TORCH_STORAGES[name])
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain tensor archive")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type = pid[1]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        return _Storage(key=str(pid[2]), dtype=storage_type.dtype)


@dataclass(frozen=True)
class _RawTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file_offset: int
    nbytes: int
    contiguous: bool


def _row_major(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _local_header_end(f: Any, info: zipfile.ZipInfo, path: Path) -> int:
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise LayoutError(ERR_NOT_ZIP.format(path=path, reason=f"bad header of {info.filename}"))
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_torch_tensors(path: str | Path) -> tuple[int, list[_RawTensor]]:
    """(file size, tensors in the file's key order) of a torch zip archive, from its headers."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise LayoutError(ERR_NOT_ZIP.format(path=path, reason=exc)) from exc
    with archive, path.open("rb") as f:
        infos = archive.infolist()
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                method = zipfile.compressor_names.get(info.compress_type, info.compress_type)
                raise CompressedEntryError(
                    ERR_COMPRESSED.format(path=path, entry=info.filename, method=method)
                )
        pickles = [
            i for i in infos if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")
        ]
        if len(pickles) != 1:
            raise LayoutError(ERR_NO_PICKLE.format(path=path))
        prefix = pickles[0].filename.removesuffix("data.pkl")
        byteorder = prefix + "byteorder"
        if byteorder in archive.NameToInfo:
            order = archive.read(byteorder).decode(errors="replace").strip()
            if order != "little":
                raise LayoutError(ERR_BYTEORDER.format(path=path, order=order))
        try:
            state = _DescribingUnpickler(archive.open(pickles[0])).load()
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as exc:
            raise LayoutError(ERR_PICKLE.format(path=path, reason=exc)) from exc
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()
        ):
            raise LayoutError(ERR_PICKLE.format(path=path, reason="expected a dict of tensors"))
        size = path.stat().st_size
        data = {}
        for info in infos:
            if info.filename.startswith(prefix + "data/"):
                key = info.filename.removeprefix(prefix + "data/")
                data[key] = (_local_header_end(f, info, path), info.file_size)
    tensors = []
    for name, ref in state.items():
        if ref.storage.key not in data:
            raise LayoutError(ERR_STORAGE.format(path=path, name=name, key=ref.storage.key))
        itemsize = ITEMSIZE[ref.storage.dtype]
        start, length = data[ref.storage.key]
        numel = math.prod(ref.shape)
        span = 1 + sum((n - 1) * abs(s) for n, s in zip(ref.shape, ref.stride, strict=True))
        first = start + ref.offset * itemsize
        end = first + (span if numel else 0) * itemsize
        if ref.offset < 0 or end > start + length or end > size:
            raise LayoutError(ERR_BOUNDS.format(path=path, name=name, start=first, end=end))
        tensors.append(
            _RawTensor(
                name=name,
                dtype=ref.storage.dtype,
                shape=ref.shape,
                file_offset=first,
                nbytes=numel * itemsize,
                contiguous=_row_major(ref.shape, ref.stride),
            )
        )
    return size, tensors


@dataclass(frozen=True)
class _Shape:
    """Stands in for a tensor in ``plan_tensors``, which only looks at shapes."""

    shape: tuple[int, ...]


def _split_map(
    name: str, shape: tuple[int, ...], axis: int | None, offset: int, merged: tuple[int, ...]
) -> RowMap:
    row_len = shape[-1] if shape else 1
    if axis is None:
        return RowMap(row_len=row_len, row_stride=row_len)
    if len(shape) == 1 and axis == 0:
        return RowMap(row_len=row_len, row_stride=row_len, base=offset)
    if len(shape) != 2:
        raise LayoutError(ERR_SPLIT_RANK.format(name=name, rank=len(shape), axis=axis))
    if axis == 0:
        return RowMap(row_len=row_len, row_stride=row_len, base=offset * row_len)
    return RowMap(row_len=row_len, row_stride=merged[1], base=offset)


def meta_layout(
    path: str | Path,
    *,
    shard_index: int | None = None,
    n_shards: int,
    shard_shapes: list[dict[str, tuple[int, ...]]] | None = None,
) -> FileLayout:
    """Shard ``shard_index`` (default: from the ``consolidated.NN.pth`` name) of ``n_shards``.

    ``shard_shapes`` (every shard's tensor shapes, in shard order) places the slices exactly;
    without it every shard is taken to hold the same shapes as this one, as LLaMA's do.
    The model width, needed to tell LLaMA 3's vocabulary-split embedding, is ``norm.weight``'s
    length.
    """
    path = Path(path)
    if shard_index is None:
        match = SHARD_RE.match(path.name)
        if not match:
            raise LayoutError(ERR_SHARD_NAME.format(path=path))
        shard_index = int(match.group(1))
    if not 0 <= shard_index < n_shards:
        raise LayoutError(ERR_SHARD_INDEX.format(path=path, index=shard_index, last=n_shards - 1))
    size, raw = read_torch_tensors(path)
    own = {t.name: t.shape for t in raw}
    shapes = shard_shapes or [own] * n_shards
    dim = (own.get("norm.weight") or (0,))[0]
    names = [f"shard {i}" for i in range(n_shards)]
    try:
        plan = plan_tensors(names, [{k: _Shape(s) for k, s in sh.items()} for sh in shapes], dim)  # type: ignore[arg-type]
    except CheckpointError as exc:
        raise LayoutError(f"{path}: {exc}") from exc
    extents = []
    for t in raw:
        sharded = plan.get(t.name)
        if sharded is None or n_shards == 1:
            axis, offset, merged = None, 0, t.shape
        else:
            axis, offset = sharded.axis, slice_offsets(sharded)[shard_index]  # type: ignore[arg-type]
            merged = sharded.shape
        extents.append(
            TensorExtent(
                name=t.name,
                stored_name=t.name,
                dtype=t.dtype,
                shape=t.shape,
                merged_shape=tuple(merged),
                file_offset=t.file_offset,
                nbytes=t.nbytes,
                contiguous=t.contiguous,
                rows=_split_map(t.name, t.shape, axis, offset, tuple(merged)),
                mapped=t.name not in IGNORED,
            )
        )
    return _file_layout(path, "meta", size, extents, shard_index, n_shards)


def _file_layout(
    path: Path, fmt: str, size: int, extents: list[TensorExtent], index: int = 0, n: int = 1
) -> FileLayout:
    extents.sort(key=lambda e: e.file_offset)
    reach: TensorExtent | None = None  # the extent reaching furthest so far
    for e in extents:
        if not e.nbytes:
            continue
        if (
            reach is not None
            and e.file_offset < reach.end
            and (e.fingerprinted or reach.fingerprinted)
        ):
            # Shared storage: a byte of a marked tensor would also be another tensor's.
            raise LayoutError(ERR_SHARED.format(path=path, a=reach.stored_name, b=e.stored_name))
        if reach is None or e.end > reach.end:
            reach = e
    return FileLayout(str(path), fmt, size, tuple(extents), index, n)


# --- transformers safetensors --------------------------------------------------------------


def meta_name(hf: str) -> str | None:
    """The Meta name of a transformers tensor name; None when it has none."""
    if hf in META_TOP:
        return META_TOP[hf]
    parts = hf.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None
    module = META_MODULES.get(".".join(parts[3:-1]))
    return None if module is None else f"layers.{parts[2]}.{module}.{parts[-1]}"


def read_safetensors_header(path: str | Path) -> tuple[int, int, dict[str, Any]]:
    """(file size, offset of the data area, header entries) of a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise LayoutError(ERR_SAFETENSORS.format(path=path, reason="shorter than 8 bytes"))
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise LayoutError(ERR_SAFETENSORS.format(path=path, reason=f"header length {n}"))
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise LayoutError(ERR_SAFETENSORS.format(path=path, reason=exc)) from exc
    if not isinstance(header, dict):
        raise LayoutError(ERR_SAFETENSORS.format(path=path, reason="header is not an object"))
    header.pop("__metadata__", None)
    return size, 8 + n, header


def safetensors_layout(path: str | Path, *, config: dict[str, Any]) -> FileLayout:
    """A safetensors file of the transformers variant; ``config`` is its config.json."""
    path = Path(path)
    if "num_attention_heads" not in config:
        raise LayoutError(ERR_CONFIG.format(path=path))
    heads = SimpleNamespace(
        n_heads=config["num_attention_heads"],
        kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    size, data_start, header = read_safetensors_header(path)
    extents = []
    for stored, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(ERR_SAFETENSORS.format(path=path, reason=f"{stored}: {exc}")) from exc
        if dtype not in ITEMSIZE:
            raise LayoutError(ERR_DTYPE.format(path=path, name=stored, dtype=entry["dtype"]))
        if (
            not 0 <= begin <= end
            or data_start + end > size
            or end - begin != math.prod(shape) * ITEMSIZE[dtype]
        ):
            raise LayoutError(
                ERR_BOUNDS.format(
                    path=path, name=stored, start=data_start + begin, end=data_start + end
                )
            )
        name = meta_name(stored)
        row_len = shape[-1] if shape else 1
        n_heads = rotary_heads(heads, name) if name and len(shape) == 2 else None  # type: ignore[arg-type]
        perm = rotary_rows(shape[0], n_heads) if n_heads else None
        extents.append(
            TensorExtent(
                name=name or stored,
                stored_name=stored,
                dtype=dtype,
                shape=shape,
                merged_shape=shape,
                file_offset=data_start + begin,
                nbytes=end - begin,
                contiguous=True,
                rows=RowMap(row_len=row_len, row_stride=row_len, perm=perm),
                mapped=name is not None,
            )
        )
    return _file_layout(path, "safetensors", size, extents)


# --- a model directory ---------------------------------------------------------------------


def directory_layouts(directory: str | Path) -> dict[str, FileLayout]:
    """Every weight file of a Meta-layout model directory (params.json, consolidated.NN.pth:
    the slices placed from all shards' shapes) or of a transformers one (config.json,
    *.safetensors), by file name."""
    directory = Path(directory)
    if (directory / PARAMS).exists():
        try:
            shards = shard_paths(directory)
        except CheckpointError as exc:
            raise LayoutError(str(exc)) from exc
        shapes = [{t.name: t.shape for t in read_torch_tensors(p)[1]} for p in shards]
        return {
            p.name: meta_layout(p, shard_index=i, n_shards=len(shards), shard_shapes=shapes)
            for i, p in enumerate(shards)
        }
    files = sorted(directory.glob("*" + SAFETENSORS_SUFFIX))
    if files and (directory / CONFIG).exists():
        config = json.loads((directory / CONFIG).read_text())
        return {p.name: safetensors_layout(p, config=config) for p in files}
    raise LayoutError(ERR_NO_WEIGHTS.format(path=directory))


def layout_for(
    path: str | Path, name: str, *, n_shards: int = 1, config: dict[str, Any] | None = None
) -> FileLayout:
    """The layout of the file stored at ``path`` and published as ``name``, for storage that
    keeps files apart from their siblings: a ``consolidated.NN.pth`` is shard NN of
    ``n_shards`` (the release's count of them), a safetensors file needs its ``config``
    (config.json's content)."""
    base = name.rsplit("/", 1)[-1]
    if match := SHARD_RE.match(base):
        return meta_layout(path, shard_index=int(match.group(1)), n_shards=n_shards)
    if base.endswith(SAFETENSORS_SUFFIX):
        return safetensors_layout(path, config=config or {})
    raise LayoutError(ERR_NOT_WEIGHTS.format(name=name))


def file_layout(path: str | Path) -> FileLayout:
    """The layout of one weight file, placed by its siblings (see ``directory_layouts``)."""
    path = Path(path)
    return directory_layouts(path.parent)[path.name]
