"""The LLaMA architecture, with parameter names matching Meta's checkpoints.

Modules are named like facebookresearch/llama so a merged ``consolidated.*.pth``
state dict loads without renaming. Positions are per row, so one batch can hold
sequences at different offsets (continuous batching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Build from a Meta ``params.json`` dict; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**params, **overrides}.items() if k in known}
        return cls(**values)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelArgs:
        return cls(**{**CONFIGS[name], **overrides})

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width, computed exactly as Meta's ``FeedForward`` does."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, norm_eps=1e-6),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, norm_eps=1e-6),
    "33B": dict(dim=6656, n_layers=60, n_heads=52, vocab_size=32000, norm_eps=1e-6),
    "65B": dict(dim=8192, n_layers=80, n_heads=64, vocab_size=32000, norm_eps=1e-6),
    "70B": dict(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=32000,
        multiple_of=4096,
        ffn_dim_multiplier=1.3,
    ),
}


@dataclass
class Step:
    """What every layer needs for one forward call, computed once per call."""

    pos: Tensor  # [B, S] absolute positions
    rope: tuple[Tensor, Tensor]  # cos and sin parts, each [B, S, 1, D/2, 2]
    mask: Tensor | None  # [B, 1, S, L] over cache positions; None: plain causal attention
    rows: Tensor  # [B, 1] cache rows
    first_row: int


class KVCache(nn.Module):
    def __init__(
        self, batch: int, heads: int, seq_len: int, head_dim: int, *, device: Any, dtype: Any
    ) -> None:
        super().__init__()
        shape = (batch, heads, seq_len, head_dim)  # [B, Hkv, S_max, D]
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, step: Step, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v [B, S, Hkv, D] -> this batch's rows over the first L positions [B, Hkv, L, D]
        self.k[step.rows, :, step.pos] = k
        self.v[step.rows, :, step.pos] = v
        assert step.mask is not None
        rows = slice(step.first_row, step.first_row + step.pos.shape[0])
        kv_len = step.mask.shape[-1]
        return self.k[rows, :, :kv_len], self.v[rows, :, :kv_len]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # In float32 and back, as Meta's RMSNorm does (no casts when already float32:
        # on the CPU the decode step is dominated by per-op overhead).
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_table(head_dim: int, seq_len: int, theta: float, device: Any) -> Tensor:
    """Meta's ``precompute_freqs_cis`` in real form: [S_max, 2, D/2, 2] float32.

    Per position and pair: ((cos, cos), (-sin, sin)), so that rotating an (even, odd)
    pair is ``x * table[0] + x.flip(-1) * table[1]``, the complex product Meta computes
    (real arithmetic, because inductor does not generate code for complex tensors).
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), freqs)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.stack([cos, cos], -1), torch.stack([-sin, sin], -1)], 1)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    pairs = x.unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2]
    if x.dtype != torch.float32:
        pairs = pairs.float()
    out = pairs * rope[0] + pairs.flip(-1) * rope[1]
    return out.flatten(-2).to(x.dtype)


@torch.no_grad()
def fuse_linears(*linears: nn.Linear) -> Tensor:
    """Stack weights for one matmul; the Linears keep their (Meta) names as views into it."""
    fused = torch.cat([lin.weight for lin in linears])
    for lin, part in zip(linears, fused.split([lin.out_features for lin in linears]), strict=True):
        lin.weight = nn.Parameter(part, requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None
        self.wqkv: Tensor | None
        self.register_buffer("wqkv", None, persistent=False)  # set by setup_caches

    def forward(self, x: Tensor, step: Step) -> Tensor:
        b, s, _ = x.shape
        if self.wqkv is None:
            qkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        else:
            qkv = F.linear(x, self.wqkv)
        qkv = qkv.view(b, s, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk = apply_rope(qkv[:, :, : self.n_heads + self.n_kv_heads], step.rope)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        v = qkv[:, :, self.n_heads + self.n_kv_heads :]
        if self.cache is None:  # training, or full recomputation from position 0
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        else:
            keys, values = self.cache.update(step, k, v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [B, H, S, D]
            keys,  # [B, Hkv, L, D]
            values,
            attn_mask=step.mask,
            is_causal=step.mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # [B, H, S, D]
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w13: Tensor | None
        self.register_buffer("w13", None, persistent=False)  # set by setup_caches

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        h = x + self.attention(self.attention_norm(x), step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_batch_size = 0
        self.max_seq_len = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate KV caches on the device and in the dtype of the weights.

        Also fuses wq/wk/wv and w1/w3 into single matmuls (the parameters become views
        into the fused weights): call it once the model is on its device, for inference.
        """
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} > model limit {self.args.max_seq_len}")
        a, device, dtype = self.args, self.output.weight.device, self.output.weight.dtype
        for layer in self.layers:
            attention, ffn = layer.attention, layer.feed_forward
            attention.cache = KVCache(
                max_batch_size, a.kv_heads, max_seq_len, a.head_dim, device=device, dtype=dtype
            )
            if attention.wqkv is None:  # once: compiled graphs may still hold the first
                attention.wqkv = fuse_linears(attention.wq, attention.wk, attention.wv)
                ffn.w13 = fuse_linears(ffn.w1, ffn.w3)
        rope = rope_table(a.head_dim, max_seq_len, a.rope_theta, device)
        self.register_buffer("rope", rope, persistent=False)
        self.register_buffer(
            "positions", torch.arange(max_seq_len, device=device), persistent=False
        )
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def forward(
        self, tokens: Tensor, pos: Tensor, first_row: int = 0, *, last_only: bool = False
    ) -> Tensor:
        """tokens, pos [B, S], using cache rows first_row..first_row+B. Returns logits [B, S, V]
        ([B, 1, V] with ``last_only``, which spares a prefill the vocabulary projection).

        Before ``setup_caches`` this is plain causal attention over ``tokens`` starting at
        position 0 (training, and full recomputation in tests).
        """
        b = tokens.shape[0]
        rows = torch.arange(first_row, first_row + b, device=tokens.device).unsqueeze(1)
        if self.max_seq_len:
            kv_len = self.max_seq_len
            if not torch.compiler.is_compiling():
                # Eager: attend over the used part of the cache only (one sync, cheap on CPU);
                # compiled code keeps a single static shape, as CUDA graphs need.
                kv_len = min(kv_len, (int(pos.max()) // 64 + 1) * 64)
            mask = (self.positions[:kv_len] <= pos.unsqueeze(-1)).unsqueeze(1)
            table = self.rope[pos]
        else:
            a = self.args
            mask = None
            table = rope_table(a.head_dim, a.max_seq_len, a.rope_theta, tokens.device)[pos]
        table = table.unsqueeze(2)  # [B, S, 1, 2, D/2, 2]
        step = Step(pos, (table[..., 0, :, :], table[..., 1, :, :]), mask, rows, first_row)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, step)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h))


def init_weights(model: Transformer, generator: torch.Generator) -> None:
    """Small random weights (for the demo trainer and tests), scaled like GPT-2."""
    std = 0.02
    for name, p in model.named_parameters():
        if p.ndim == 1:
            nn.init.ones_(p)
            continue
        scale = (
            std / math.sqrt(2 * model.args.n_layers)
            if name.endswith(("wo.weight", "w2.weight"))
            else std
        )
        with torch.no_grad():
            p.normal_(0.0, scale, generator=generator)
