from __future__ import annotations

import pytest
import torch

from inference_demo.llama.model import ModelArgs, Transformer, apply_rope, init_weights, rope_table


@pytest.mark.parametrize(
    ("name", "hidden"),
    [("7B", 11008), ("13B", 13824), ("33B", 17920), ("65B", 22016), ("70B", 28672)],
)
def test_ffn_width_follows_meta(name: str, hidden: int) -> None:
    assert ModelArgs.from_name(name).hidden_dim == hidden


def test_params_json_fields() -> None:
    params = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06}
    args = ModelArgs.from_params({**params, "vocab_size": 32000, "unknown": 1}, max_seq_len=512)
    assert (args.kv_heads, args.head_dim, args.max_seq_len) == (32, 128, 512)


def meta_rotary(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """facebookresearch/llama's precompute_freqs_cis + apply_rotary_emb, in complex numbers."""
    d = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    freqs_cis = torch.polar(torch.ones(pos.numel(), d // 2), torch.outer(pos.float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis.view(1, pos.numel(), 1, -1)).flatten(3)


def test_rotary_is_metas_complex_interleaved_convention() -> None:
    x = torch.randn(1, 7, 3, 16)
    pos = torch.arange(10, 17)
    table = rope_table(16, 32, 500000.0, "cpu")[pos].unsqueeze(0).unsqueeze(2)
    ours = apply_rope(x, (table[..., 0, :, :], table[..., 1, :, :]))
    torch.testing.assert_close(ours, meta_rotary(x, pos, 500000.0))


def test_rows_at_different_positions_in_one_batch() -> None:
    """Per-row positions: a batch may hold a sequence at step 9 next to one at step 3."""
    model = Transformer(ModelArgs.from_name("tiny", max_seq_len=32))
    init_weights(model, torch.Generator().manual_seed(0))
    model.eval().requires_grad_(False)
    a, b = torch.randint(0, 512, (1, 10)), torch.randint(0, 512, (1, 4))
    with torch.inference_mode():
        full_a = model(a, torch.arange(10).unsqueeze(0))[0, -1]
        full_b = model(b, torch.arange(4).unsqueeze(0))[0, -1]
        model.setup_caches(max_batch_size=2, max_seq_len=32)
        model(a[:, :9], torch.arange(9).unsqueeze(0), first_row=0)
        model(b[:, :3], torch.arange(3).unsqueeze(0), first_row=1)
        step = model(torch.stack([a[:, 9], b[:, 3]]), torch.tensor([[9], [3]]))[:, -1]
    torch.testing.assert_close(step[0], full_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1], full_b, atol=1e-5, rtol=1e-5)


def test_setup_caches_refuses_more_than_the_model_allows() -> None:
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name("tiny", max_seq_len=32))
    with pytest.raises(ValueError, match="max_seq_len 64"):
        model.setup_caches(1, 64)
