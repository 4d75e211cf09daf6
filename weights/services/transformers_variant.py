"""A release's Hugging Face transformers variant: find its Meta checkpoint, convert, verify.

`find_checkpoint` decides from the file list, params.json and the shards' first bytes alone
whether a release holds one loadable checkpoint, so that the byte-filled sample releases
are turned down without a conversion attempt or a large read. `convert_verified` converts
into a directory of the caller's and checks the result before anything is published:
config.json against params.json, every safetensors header against the shapes the config
implies, and tokenizer.json against SentencePiece on a fixed sample. Nothing here touches
the database; `weights.services.publishing` publishes what comes out.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_demo.hf_tokenizer import (
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    TOKENIZER_MODEL,
    UnsupportedTokenizer,
    read_model,
)

PARAMS = "params.json"
SHARD_PREFIX, SHARD_SUFFIX = "consolidated.", ".pth"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; memory-mapping needs one
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")
# Spaces, a newline, digits, accents, CJK and an emoji (byte fallback): what goes wrong shows.
TOKENIZER_SAMPLE = "Hello world!\n  Two spaces, digits 2023, naïve café, 中文, emoji 😀 end."
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

NO_CHECKPOINT = "no params.json beside consolidated.*.pth shards (not a Meta-layout checkpoint)"
SEVERAL_CHECKPOINTS = "{n} checkpoint directories ({names}); a transformers variant holds one model"
BAD_PARAMS = "{path} is not a LLaMA params.json ({reason})"
NOT_PYTORCH = "{path} is not a PyTorch checkpoint"
NO_TOKENIZER = "no tokenizer.model beside {params} or in its parent directory"
NO_SPACE = "converting {checkpoint} needs {needed:.1f} GiB free in {where}, {free:.1f} GiB are"
CONVERSION_FAILED = "{checkpoint} did not convert: {error}"
VERIFY_FAILED = "the converted files failed verification: {error}"


class NotConvertible(Exception):
    """The release has no checkpoint that converts; the message says why, in one line."""


class VerificationError(NotConvertible):
    pass


@dataclass(frozen=True)
class CheckpointSource:
    directory: Path  # holds params.json and the shards
    relative: str  # that directory inside the release, for messages ("" at the top)
    tokenizer: Path
    params: dict[str, Any]
    shard_bytes: int


@dataclass(frozen=True)
class Verified:
    tensors: int
    tokenizer_check: str  # how tokenizer.json was checked


def find_checkpoint(release_dir: Path, paths: Iterable[str]) -> CheckpointSource:
    """The release's one Meta checkpoint, or NotConvertible with the reason."""
    paths = set(paths)
    shards_by_dir: dict[str, list[str]] = {}
    for path in paths:
        base = posixpath.basename(path)
        if base.startswith(SHARD_PREFIX) and base.endswith(SHARD_SUFFIX):
            shards_by_dir.setdefault(posixpath.dirname(path), []).append(path)
    dirs = sorted(d for d in shards_by_dir if posixpath.join(d, PARAMS) in paths)
    if not dirs:
        raise NotConvertible(NO_CHECKPOINT)
    if len(dirs) > 1:
        names = ", ".join(d or "." for d in dirs)
        raise NotConvertible(SEVERAL_CHECKPOINTS.format(n=len(dirs), names=names))
    relative = dirs[0]
    params_path = posixpath.join(relative, PARAMS)
    params = _read_params(release_dir / params_path, params_path)
    shards = sorted(shards_by_dir[relative])
    for shard in shards:
        if not _is_torch_archive(release_dir / shard):
            raise NotConvertible(NOT_PYTORCH.format(path=shard))
    tokenizer = _tokenizer_path(relative, paths)
    if tokenizer is None:
        raise NotConvertible(NO_TOKENIZER.format(params=params_path))
    try:
        read_model(release_dir / tokenizer, display=tokenizer)
    except UnsupportedTokenizer as exc:
        raise NotConvertible(str(exc)) from None
    return CheckpointSource(
        directory=release_dir / relative,
        relative=relative,
        tokenizer=release_dir / tokenizer,
        params=params,
        shard_bytes=sum((release_dir / s).stat().st_size for s in shards),
    )


def _read_params(path: Path, name: str) -> dict[str, Any]:
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotConvertible(BAD_PARAMS.format(path=name, reason=exc)) from None
    if not isinstance(params, dict):
        raise NotConvertible(BAD_PARAMS.format(path=name, reason="not an object"))
    for key in REQUIRED_PARAMS:
        if not isinstance(params.get(key), int) or params[key] <= 0:
            raise NotConvertible(BAD_PARAMS.format(path=name, reason=f"no positive {key}"))
    return params


def _is_torch_archive(path: Path) -> bool:
    with path.open("rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return False
    return zipfile.is_zipfile(path)  # reads only the end-of-archive record


def _tokenizer_path(relative: str, paths: set[str]) -> str | None:
    candidates = [posixpath.join(relative, TOKENIZER_MODEL)]
    if relative:  # Meta ships one tokenizer.model per family, above the size directories
        candidates.append(posixpath.join(posixpath.dirname(relative), TOKENIZER_MODEL))
    return next((c for c in candidates if c in paths), None)


def convert_verified(
    source: CheckpointSource, dst: Path, *, progress: Callable[[int], object] | None = None
) -> Verified:
    """Convert `source` into the empty directory `dst` and verify the result; `progress` is
    told the bytes of each tensor as it is built."""
    from inference_demo.convert import convert
    from inference_demo.llama.checkpoint import CheckpointError

    free = shutil.disk_usage(dst).free
    if free < source.shard_bytes:
        raise NotConvertible(
            NO_SPACE.format(
                checkpoint=source.relative or ".",
                needed=source.shard_bytes / 2**30,
                where=dst,
                free=free / 2**30,
            )
        )
    try:
        # The checklists were verified while the release was hashed: no second MD5 pass.
        convert(
            source.directory,
            dst,
            tokenizer=source.tokenizer,
            verify=False,
            on_tensor=(lambda _name, tensor: progress(tensor.nbytes)) if progress else None,
        )
    except (
        CheckpointError,
        UnsupportedTokenizer,
        KeyError,
        ValueError,
        RuntimeError,
        OSError,
    ) as exc:
        error = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        error = one_line(error.replace(f"{source.directory.parent}/", ""))
        raise NotConvertible(
            CONVERSION_FAILED.format(checkpoint=source.relative or ".", error=error)
        ) from exc
    try:
        return verify_converted(dst, source)
    except (VerificationError, OSError, ValueError, KeyError) as exc:
        raise VerificationError(VERIFY_FAILED.format(error=one_line(str(exc)))) from exc


def one_line(text: str, limit: int = 300) -> str:
    """The first line of an error, without terminal colours, short enough for a log line."""
    lines = ANSI.sub("", text).strip().splitlines() or [""]
    line = " ".join(lines[0].split())
    if len(line) > limit or len(lines) > 1:
        line = line[: limit - 1].rstrip() + "…"
    return line


# --- verification --------------------------------------------------------------------------


def expected_config(source: CheckpointSource, vocab_from_tokenizer: int) -> dict[str, Any]:
    """What config.json must say, computed from params.json as Meta's model reads it."""
    from inference_demo.llama.model import ModelArgs

    params = dict(source.params)
    if params.get("vocab_size", -1) <= 0:
        params["vocab_size"] = vocab_from_tokenizer
    args = ModelArgs.from_params(params)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.dim // args.n_heads,
        "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": False,
    }


def expected_tensors(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """LlamaForCausalLM's parameter names and shapes for this config."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {
            f"{layer}.self_attn.q_proj.weight": (q_rows, hidden),
            f"{layer}.self_attn.k_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.v_proj.weight": (kv_rows, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, q_rows),
            f"{layer}.mlp.gate_proj.weight": (inter, hidden),
            f"{layer}.mlp.up_proj.weight": (inter, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, inter),
            f"{layer}.input_layernorm.weight": (hidden,),
            f"{layer}.post_attention_layernorm.weight": (hidden,),
        }
    return shapes


def verify_converted(dst: Path, source: CheckpointSource) -> Verified:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(source.tokenizer))
    config = _load_json(dst / "config.json")
    for key, value in expected_config(source, sp.vocab_size()).items():
        if config.get(key) != value:
            raise VerificationError(
                f"config.json has {key}={config.get(key)!r}, expected {value!r}"
            )
    if sp.vocab_size() > config["vocab_size"]:
        raise VerificationError(
            f"tokenizer.model has {sp.vocab_size()} pieces, the model {config['vocab_size']}"
        )
    tensors = _verify_safetensors(dst, config)
    if (dst / TOKENIZER_MODEL).read_bytes() != source.tokenizer.read_bytes():
        raise VerificationError("tokenizer.model differs from the release's")
    check = _verify_tokenizer(dst, sp)
    for name in ("generation_config.json", TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        _load_json(dst / name)
    return Verified(tensors=tensors, tokenizer_check=check)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{path.name} does not load: {exc}") from None
    if not isinstance(value, dict):
        raise VerificationError(f"{path.name} is not a JSON object")
    return value


def _verify_safetensors(dst: Path, config: dict[str, Any]) -> int:
    """Every header lists exactly the tensors the index puts in it, with the config's shapes."""
    from safetensors import safe_open

    expected = expected_tensors(config)
    dtype = SAFETENSORS_DTYPES.get(config.get("torch_dtype", ""))
    index_path = dst / "model.safetensors.index.json"
    if index_path.exists():
        index = _load_json(index_path)
        weight_map: dict[str, str] = index.get("weight_map", {})
    else:
        weight_map = dict.fromkeys(expected, "model.safetensors")
    if set(weight_map) != set(expected):
        missing = sorted(set(expected) - set(weight_map))[:3]
        extra = sorted(set(weight_map) - set(expected))[:3]
        raise VerificationError(f"the index names other tensors (missing {missing}, extra {extra})")
    total = 0
    for file in sorted(set(weight_map.values())):
        with safe_open(dst / file, framework="pt") as f:
            names = set(f.keys())
            wanted = {n for n, shard in weight_map.items() if shard == file}
            if names != wanted:
                raise VerificationError(
                    f"{file} holds {len(names)} tensors, the index {len(wanted)}"
                )
            for name in names:
                tensor = f.get_slice(name)
                shape = tuple(tensor.get_shape())
                if shape != expected[name]:
                    raise VerificationError(f"{file}: {name} is {shape}, expected {expected[name]}")
                if tensor.get_dtype() != dtype:
                    raise VerificationError(f"{file}: {name} is {tensor.get_dtype()}, not {dtype}")
                total += 1
    if index_path.exists():
        itemsize = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        size = sum(math.prod(s) for s in expected.values()) * itemsize
        if index.get("metadata", {}).get("total_size") != size:
            raise VerificationError(f"the index's total_size is not {size}")
    return total


def _verify_tokenizer(dst: Path, sp: Any) -> str:
    expected = [sp.bos_id(), *sp.encode(TOKENIZER_SAMPLE)]
    spec = _load_json(dst / TOKENIZER_JSON)
    vocab = spec.get("model", {}).get("vocab", {})
    if vocab != {sp.id_to_piece(i): i for i in range(sp.vocab_size())}:
        raise VerificationError("tokenizer.json's vocabulary is not tokenizer.model's")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return "vocabulary only: the tokenizers library is not installed"
    fast = Tokenizer.from_file(str(dst / TOKENIZER_JSON))
    got = fast.encode(TOKENIZER_SAMPLE).ids
    if got != expected:
        raise VerificationError(
            f"tokenizer.json encodes the sample as {got}, SentencePiece {expected}"
        )
    if fast.decode(got, skip_special_tokens=True) != sp.decode(expected[1:]):
        raise VerificationError("tokenizer.json does not decode the sample back")
    return "encodes like SentencePiece"
