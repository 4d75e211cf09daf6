"""The bundled demo model: its build, its layout, and golden outputs."""

from __future__ import annotations

import json
import sys

from django.core.management import call_command

from inference_demo.llama.checkpoint import load_model, verify_checklist
from inference_demo.llama.demo_builder import DemoConfig, build_demo_model
from inference_demo.llama.generation import SamplingParams, generate

SMALL = DemoConfig(
    vocab_size=700, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, seq_len=32, batch_size=2, steps=2
)

# Greedy and seeded-sampling outputs of the committed model on the CPU in float32.
GOLDEN_GREEDY = (
    "\n"
    "********************\n"
    "\n"
    'The "try" statement is used to wrap the "finally" clause’s\n'
    "context, and the exception has been assigned to it.\n"
    "\n"
    'The "return" statement is used for repeated execution'
)
GOLDEN_SAMPLED = (
    "\n"
    "********************\n"
    "\n"
    "An\n"
    "\n"
    'A *context manager* is determined by using "None" statement with the\n'
    "exception level. The raise statement with theishes execution\n"
    "exception groupinates in the context related code in the"
)


def test_committed_model_is_a_meta_release(demo_dir) -> None:
    names = sorted(p.name for p in demo_dir.iterdir() if p.name != "README.md")
    assert names == [
        "checklist.chk",
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
        "tokenizer.model",
        "tokenizer_checklist.chk",
    ]
    verify_checklist(demo_dir)
    verify_checklist(demo_dir, "tokenizer_checklist.chk")
    params = json.loads((demo_dir / "params.json").read_text())
    assert params["n_kv_heads"] < params["n_heads"]  # the demo exercises GQA
    total = sum(p.stat().st_size for p in demo_dir.iterdir())
    assert total < 10_000_000


def test_golden_greedy(demo_model, demo_tokenizer) -> None:
    stream = generate(
        demo_model, demo_tokenizer, "The for statement", SamplingParams(max_new_tokens=48)
    )
    assert stream.collect().text == GOLDEN_GREEDY


def test_golden_sampled(demo_model, demo_tokenizer) -> None:
    params = SamplingParams(max_new_tokens=48, temperature=0.8, top_k=40, top_p=0.95, seed=42)
    stream = generate(demo_model, demo_tokenizer, "The for statement", params)
    assert stream.collect().text == GOLDEN_SAMPLED


def test_build_is_reproducible(tmp_path) -> None:
    first = build_demo_model(tmp_path / "a", SMALL, log=lambda _: None)
    second = build_demo_model(tmp_path / "b", SMALL, log=lambda _: None)
    for name in ("checklist.chk", "tokenizer_checklist.chk"):
        assert (first / name).read_text() == (second / name).read_text()
    model = load_model(first)
    assert model.args.n_kv_heads == 2


def test_management_command(tmp_path, capsys) -> None:
    call_command("build_demo_model", out=str(tmp_path / "demo"), steps=1)
    assert "demo model written" in capsys.readouterr().out
    assert (tmp_path / "demo" / "consolidated.01.pth").exists()


def test_loading_the_command_module_does_not_import_torch() -> None:
    import importlib
    import subprocess

    code = (
        "import sys, importlib;"
        "importlib.import_module('inference_demo.management.commands.build_demo_model');"
        "importlib.import_module('inference_demo');"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    importlib.invalidate_caches()
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
