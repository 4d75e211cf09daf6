"""Convert a Meta-layout release into a Hugging Face ``LlamaForCausalLM`` directory.

    python -m inference_demo.convert SRC DST [--dtype bfloat16] [--tokenizer PATH]

Writes config.json, generation_config.json, safetensors weights (sharded above
``--max-shard-gb``) and the SentencePiece tokenizer with its config. Imports
neither transformers nor anything else outside torch, safetensors and the stdlib.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from inference_demo.llama.checkpoint import load_state_dict
from inference_demo.llama.model import ModelArgs

LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ERR_NO_TOKENIZER = "no tokenizer.model in {src} or its parent; pass --tokenizer"


def permute_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Meta rotates interleaved (even, odd) pairs, HF rotates halves: reorder q/k rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(args: ModelArgs, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        if key in TOP_NAMES:
            out[TOP_NAMES[key]] = tensor
            continue
        _, index, rest = key.split(".", 2)  # "layers.3.attention.wq.weight"
        module, param = rest.rsplit(".", 1)
        if module == "attention.wq":
            tensor = permute_rotary(tensor, args.n_heads)
        elif module == "attention.wk":
            tensor = permute_rotary(tensor, args.kv_heads)
        out[f"model.layers.{index}.{LAYER_NAMES[module]}.{param}"] = tensor
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


def write_weights(dst: Path, tensors: dict[str, Tensor], max_shard_bytes: int) -> None:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], dst / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dst / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(dst: Path, tokenizer: Path, max_len: int) -> None:
    shutil.copyfile(tokenizer, dst / "tokenizer.model")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": max_len,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


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
) -> Path:
    src, dst = Path(src), Path(dst)
    tokenizer_path = Path(tokenizer) if tokenizer else find_tokenizer(src)
    args, state_dict = load_state_dict(src, max_seq_len=max_seq_len)
    dtype = dtype or state_dict["output.weight"].dtype
    tensors = {k: v.to(dtype) for k, v in hf_state_dict(args, state_dict).items()}
    dst.mkdir(parents=True, exist_ok=True)
    write_weights(dst, tensors, max_shard_bytes)
    (dst / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(dst, tokenizer_path, max_seq_len)
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
