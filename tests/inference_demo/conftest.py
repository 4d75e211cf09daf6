from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from inference_demo.llama.checkpoint import save_checkpoint
from inference_demo.llama.model import ModelArgs, Transformer
from inference_demo.llama.tokenizer import Tokenizer

DEMO_DIR = Path(__file__).resolve().parents[2] / "inference_demo" / "demo_model"

MHA = dict(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16, norm_eps=1e-5)
GQA = dict(
    dim=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=96,
    multiple_of=16,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-6,
    rope_theta=500000.0,
)


def random_state_dict(params: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Weights large enough that logits are O(1), norms away from 1, so mistakes show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_params(params))
    state = {}
    for key, t in model.state_dict().items():
        noise = torch.randn(t.shape, generator=gen)
        state[key] = 1.0 + 0.1 * noise if t.ndim == 1 else noise / t.shape[-1] ** 0.5
    return state


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    def make(params: dict[str, Any], n_shards: int = 1, name: str = "ckpt") -> Path:
        directory = tmp_path / name
        save_checkpoint(directory, params, random_state_dict(params), n_shards=n_shards)
        return directory

    return make


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    if not (DEMO_DIR / "params.json").exists():
        pytest.fail(f"{DEMO_DIR} is missing: run manage.py build_demo_model --out {DEMO_DIR}")
    return DEMO_DIR


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir: Path) -> Tokenizer:
    return Tokenizer(demo_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def demo_model(demo_dir: Path) -> Transformer:
    from inference_demo.llama.checkpoint import load_model

    model = load_model(demo_dir, max_seq_len=256)
    model.setup_caches(max_batch_size=1, max_seq_len=256)
    return model
