"""The transformers variant's tensor names and q/k row order, without torch.

``inference_demo.convert`` writes the variant by these rules; the web process's
fingerprinting (``weights.fingerprint.layout``) reads them to map a transformers file back
onto Meta's coordinates, and must not import torch (DESIGN decision 6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
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


def hf_name(key: str) -> str:
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    _, index, rest = key.split(".", 2)  # "layers.3.attention.wq.weight"
    module, param = rest.rsplit(".", 1)
    return f"model.layers.{index}.{LAYER_NAMES[module]}.{param}"


def rotary_heads(args: ModelArgs, key: str) -> int | None:
    """How many heads to permute `key` by; None for tensors RoPE does not touch."""
    if key.endswith("attention.wq.weight"):
        return args.n_heads
    if key.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


def rotary_rows(rows: int, n_heads: int) -> np.ndarray:
    """The Meta row of each transformers row of a q/k weight: ``convert.permute_rotary``
    (Meta rotates interleaved (even, odd) pairs, HF rotates halves) on the row numbers."""
    order = np.arange(rows, dtype=np.int64).reshape(n_heads, rows // n_heads // 2, 2)
    return order.transpose(0, 2, 1).reshape(rows)
