"""Our model against transformers' LlamaForCausalLM on weights converted by inference_demo.convert."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402  (a dev dependency: missing is a broken install, not a skip)

from inference_demo.convert import convert
from inference_demo.llama.checkpoint import load_model

from .conftest import GQA, MHA


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference_demo.llama.demo_builder import corpus, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(corpus()[:10], path, vocab_size=400)
    return path


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
def test_logits_match_transformers(make_checkpoint, tokenizer_model, tmp_path, params, n_shards):
    src = make_checkpoint(params, n_shards=n_shards)
    dst = convert(src, tmp_path / "hf", tokenizer=tokenizer_model, max_seq_len=64)
    hf = transformers.LlamaForCausalLM.from_pretrained(dst, torch_dtype=torch.float32).eval()
    ours = load_model(src, max_seq_len=64)
    tokens = torch.randint(
        0, params["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1)
    )
    pos = torch.arange(17).expand(2, -1)

    with torch.inference_mode():
        expected = hf(tokens).logits
        uncached = ours(tokens, pos)
        ours.setup_caches(max_batch_size=2, max_seq_len=64)
        cached = ours(tokens, pos)

    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(uncached, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)


def test_converted_directory_and_tokenizer(make_checkpoint, tokenizer_model, tmp_path) -> None:
    from inference_demo.llama.tokenizer import Tokenizer

    dst = convert(make_checkpoint(GQA), tmp_path / "hf", tokenizer=tokenizer_model)
    assert {p.name for p in dst.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    }
    config = transformers.AutoConfig.from_pretrained(dst)
    assert (config.num_key_value_heads, config.intermediate_size) == (
        2,
        224,
    )  # int(1.3 * int(2 * 4 * 64 / 3)) rounded up to 16
    hf_tok = transformers.LlamaTokenizer.from_pretrained(dst)
    ours = Tokenizer(tokenizer_model)
    text = "The for statement is used to iterate."
    assert hf_tok(text).input_ids == ours.encode(text, bos=True, eos=False)


def test_sharded_safetensors_with_index(make_checkpoint, tokenizer_model, tmp_path) -> None:
    src = make_checkpoint(MHA)
    dst = convert(src, tmp_path / "hf", tokenizer=tokenizer_model, max_shard_bytes=64 << 10)
    assert (dst / "model.safetensors.index.json").exists()
    hf = transformers.LlamaForCausalLM.from_pretrained(dst, torch_dtype=torch.float32)
    ours = load_model(src)
    tokens = torch.arange(10).unsqueeze(0)
    with torch.inference_mode():
        torch.testing.assert_close(
            ours(tokens, torch.arange(10).unsqueeze(0)), hf(tokens).logits, atol=1e-4, rtol=1e-4
        )


def test_convert_cli(make_checkpoint, tokenizer_model, tmp_path, capsys) -> None:
    from inference_demo.convert import main

    src = make_checkpoint(MHA)
    (src.parent / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())  # Meta: per family
    main([str(src), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert "wrote" in capsys.readouterr().out
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert config.torch_dtype == torch.bfloat16
