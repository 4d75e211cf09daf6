"""Convert a Meta-layout release into a Hugging Face ``LlamaForCausalLM`` directory.

    python -m inference_demo.convert SRC DST [--dtype bfloat16] [--tokenizer PATH]

Writes config.json, generation_config.json, safetensors weights (sharded above
``--max-shard-gb``) and the tokenizer: SentencePiece's tokenizer.model, a fast
tokenizer.json and their configs. Imports neither transformers nor anything else
outside torch, safetensors, sentencepiece and the stdlib.

The conversion streams: shards are memory-mapped, each output tensor is built alone
(its model-parallel slices copied into one buffer, q/k rows permuted on the way) and
each output file is written as soon as its tensors are built, so memory holds at most
one output shard plus one tensor, whatever the size of the release.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from inference_demo.hf_layout import hf_name, rotary_heads
from inference_demo.hf_tokenizer import write_tokenizer_files
from inference_demo.llama.checkpoint import (
    ShardedTensor,
    StreamingCheckpoint,
    open_checkpoint,
)
from inference_demo.llama.model import ModelArgs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}
ERR_NO_TOKENIZER = "no tokenizer.model in {src} or its parent; pass --tokenizer"

# Told of each output tensor once built (progress bars; tests that count what is alive).
TensorHook = Callable[[str, Tensor], object]


def permute_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Meta rotates interleaved (even, odd) pairs, HF rotates halves: reorder q/k rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(args: ModelArgs, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole-dict mapping, for a model already in memory."""
    out = {}
    for key, tensor in state_dict.items():
        heads = rotary_heads(args, key)
        out[hf_name(key)] = permute_rotary(tensor, heads) if heads else tensor
    return out


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def build_tensor(source: ShardedTensor, heads: int | None, dtype: torch.dtype) -> Tensor:
    """The merged, permuted, cast tensor, in one allocation of its final size.

    A lone slice that needs no change is returned as the memory-mapped tensor itself;
    otherwise each slice is copied (cast and permuted by the copy's strides) straight into
    its place in the output, so no intermediate of the tensor's size exists (except for
    slices that cut a head in two, which no Meta layout has).
    """
    if len(source.parts) == 1 and heads is None and source.dtype == dtype:
        return source.parts[0].contiguous()
    out = torch.empty(source.shape, dtype=dtype)
    parts, axis = source.parts, source.axis
    if axis is None:
        parts = parts[:1]  # replicated, or a single slice
    head_dim = source.shape[0] // heads if heads else 0
    if heads and (axis not in (None, 0) or any(p.shape[0] % head_dim for p in parts)):
        # Slices that cut a head (no Meta layout does): merge first, at the cost of a copy.
        parts, axis = (torch.cat(parts, dim=axis or 0),), None
    offset = 0
    for part in parts:
        region = out if axis is None else out.narrow(axis, offset, part.shape[axis])
        offset += 0 if axis is None else part.shape[axis]
        if not heads:
            region.copy_(part)
            continue
        # permute_rotary, written as a strided copy into this slice's rows of the output.
        n, cols = part.shape[0] // head_dim, part.shape[1]
        region.view(n, 2, head_dim // 2, cols).copy_(
            part.view(n, head_dim // 2, 2, cols).transpose(1, 2)
        )
    return out


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per output file, in order; a tensor larger than the limit gets a file alone."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_weights(
    dst: Path,
    checkpoint: StreamingCheckpoint,
    dtype: torch.dtype,
    max_shard_bytes: int,
    on_tensor: TensorHook | None = None,
) -> list[str]:
    """Write the safetensors files (and their index when there are several); returns their names."""
    sources = {hf_name(k): t for k, t in checkpoint.tensors.items()}
    sizes = {name: t.nbytes_as(dtype) for name, t in sources.items()}
    plan = plan_shards(sizes, max_shard_bytes)
    names = shard_file_names(len(plan))
    for file_name, tensor_names in zip(names, plan, strict=True):
        _write_shard(dst / file_name, checkpoint.args, sources, tensor_names, dtype, on_tensor)
    if len(names) > 1:
        weight_map = {
            n: f for f, tensor_names in zip(names, plan, strict=True) for n in tensor_names
        }
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_shard(
    path: Path,
    args: ModelArgs,
    sources: dict[str, ShardedTensor],
    names: list[str],
    dtype: torch.dtype,
    on_tensor: TensorHook | None,
) -> None:
    """Build one file's tensors and write it; they are freed when this returns."""
    shard = {}
    for name in names:
        source = sources[name]
        shard[name] = build_tensor(source, rotary_heads(args, source.key), dtype)
        if on_tensor is not None:
            on_tensor(name, shard[name])
    save_file(shard, path, metadata=SAFETENSORS_METADATA)


def find_tokenizer(src: Path) -> Path:
    for candidate in (src / "tokenizer.model", src.parent / "tokenizer.model"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(ERR_NO_TOKENIZER.format(src=src))


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    max_seq_len: int = 2048,
    max_shard_bytes: int = 5 << 30,
    verify: bool = True,
    on_tensor: TensorHook | None = None,
) -> Path:
    """Convert `src` into `dst`. `verify=False` skips the checklist's MD5 pass (for a caller
    that has just checked it)."""
    src, dst = Path(src), Path(dst)
    tokenizer_path = Path(tokenizer) if tokenizer else find_tokenizer(src)
    checkpoint = open_checkpoint(src, verify=verify, max_seq_len=max_seq_len)
    dtype = dtype or checkpoint.tensors["output.weight"].dtype
    dst.mkdir(parents=True, exist_ok=True)
    write_weights(dst, checkpoint, dtype, max_shard_bytes, on_tensor)
    config = hf_config(checkpoint.args, dtype)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(dst, tokenizer_path, model_max_length=max_seq_len)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="directory with params.json and consolidated.NN.pth")
    parser.add_argument("dst", help="output directory for the transformers model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: SRC or its parent)")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    opts = parser.parse_args(argv)
    out = convert(
        opts.src,
        opts.dst,
        dtype=DTYPES[opts.dtype] if opts.dtype else None,
        tokenizer=opts.tokenizer,
        max_seq_len=opts.max_seq_len,
        max_shard_bytes=int(opts.max_shard_gb * (1 << 30)),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
