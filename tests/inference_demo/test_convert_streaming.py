"""The converter streams: output equals the in-memory conversion, memory stays one shard + one tensor.

Memory is measured two ways. In process, a hook counts the bytes of converted tensors alive
at once (each one's death observed with weakref.finalize). In a subprocess, the kernel caps the
converter's private memory with RLIMIT_DATA (which counts every malloc and anonymous mmap: torch,
Python, safetensors alike) at the memory-mapped shards plus one output shard plus the largest
tensor; the conversion of a ~90 MB checkpoint must fit, and loading it whole must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from inference_demo.convert import INDEX_FILE, SINGLE_FILE, convert, hf_state_dict
from inference_demo.llama.checkpoint import load_state_dict, save_checkpoint
from tests.servers import ROOT

from .conftest import GQA, MHA, random_state_dict

MIB = 1 << 20
# ~23M parameters, 92 MB in float32 over two shards; the embedding is the largest tensor.
LARGE = dict(
    dim=512, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=256, norm_eps=1e-5
)
LARGE_MAX_SHARD = 4 * MIB
LARGE_LARGEST_BF16 = 4096 * 512 * 2
SLACK = 4 * MIB  # the interpreter's own small allocations while it converts


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference_demo.llama.demo_builder import corpus, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(corpus()[:10], path, vocab_size=400)
    return path


def read_output(dst: Path) -> dict[str, torch.Tensor]:
    files = sorted(dst.glob("*.safetensors"))
    tensors = {}
    for path in files:
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["as-stored", "bf16"])
@pytest.mark.parametrize("n_shards", [1, 2, 4])  # GQA's 2 kv heads over 4 slices: cut heads
@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
def test_streamed_output_equals_the_in_memory_conversion(
    make_checkpoint, tokenizer_model, tmp_path, params, n_shards, dtype
) -> None:
    src = make_checkpoint(params, n_shards=n_shards)
    max_shard = 48 << 10
    dst = convert(
        src, tmp_path / "hf", tokenizer=tokenizer_model, dtype=dtype, max_shard_bytes=max_shard
    )

    args, state_dict = load_state_dict(src)
    expected = {k: v.to(dtype or v.dtype) for k, v in hf_state_dict(args, state_dict).items()}
    got = read_output(dst)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name

    index = json.loads((dst / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    for path in dst.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            names = list(f.keys())
        assert {n for n, file in index["weight_map"].items() if file == path.name} == set(names)
        data = sum(got[n].nbytes for n in names)
        assert data <= max_shard or len(names) == 1, path.name  # bounded files


def test_a_small_model_is_one_file_without_index(make_checkpoint, tokenizer_model, tmp_path):
    dst = convert(make_checkpoint(GQA, n_shards=2), tmp_path / "hf", tokenizer=tokenizer_model)
    assert (dst / SINGLE_FILE).exists() and not (dst / INDEX_FILE).exists()
    assert not list(dst.glob("model-*"))


def test_tensors_alive_at_once_stay_within_one_shard_plus_one_tensor(
    tokenizer_model, tmp_path
) -> None:
    src = tmp_path / "large"
    save_checkpoint(src, LARGE, random_state_dict(LARGE), n_shards=2)
    alive = peak = 0
    built = []

    def on_tensor(name: str, tensor: torch.Tensor) -> None:
        nonlocal alive, peak

        def freed(nbytes: int = tensor.nbytes) -> None:
            nonlocal alive
            alive -= nbytes

        weakref.finalize(tensor, freed)
        alive += tensor.nbytes
        peak = max(peak, alive)
        built.append(tensor.nbytes)

    convert(
        src,
        tmp_path / "hf",
        tokenizer=tokenizer_model,
        dtype=torch.bfloat16,  # every output tensor is then a fresh allocation
        max_shard_bytes=LARGE_MAX_SHARD,
        on_tensor=on_tensor,
    )
    assert max(built) == LARGE_LARGEST_BF16
    assert sum(built) > 5 * (LARGE_MAX_SHARD + LARGE_LARGEST_BF16)  # a bound that means something
    assert peak <= LARGE_MAX_SHARD + LARGE_LARGEST_BF16
    assert alive == 0  # nothing kept after its file was written


CAPPED = textwrap.dedent(
    """
    import re, resource, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)  # no worker-thread stacks appearing mid-run
    from inference_demo.convert import convert
    from inference_demo.llama.checkpoint import load_state_dict

    src, warm, tokenizer, out, mode = map(Path, sys.argv[1:6])
    budget = int(sys.argv[6])
    convert(warm, out / "warm", tokenizer=tokenizer, dtype=torch.bfloat16, max_shard_bytes=4096)

    def vm_data() -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmData:\\s+(\\d+) kB", status).group(1)) * 1024

    mapped = sum(p.stat().st_size for p in src.glob("consolidated.*.pth"))
    limit = vm_data() + mapped + budget
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    if str(mode) == "stream":
        convert(src, out / "hf", tokenizer=tokenizer, dtype=torch.bfloat16,
                max_shard_bytes=int(sys.argv[7]), verify=False)
    else:
        _, state_dict = load_state_dict(src, verify=False)
    print("converted within the cap")
    """
)


def run_capped(mode: str, tmp_path: Path, tokenizer_model: Path, budget: int):
    src, warm = tmp_path / "large", tmp_path / "warm"
    if not src.exists():
        save_checkpoint(src, LARGE, random_state_dict(LARGE), n_shards=2)
        save_checkpoint(warm, MHA, random_state_dict(MHA), n_shards=2)
    args = [src, warm, tokenizer_model, tmp_path / mode, mode, budget, LARGE_MAX_SHARD]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", CAPPED, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_private_memory_capped_at_one_shard_plus_one_tensor(tokenizer_model, tmp_path) -> None:
    budget = LARGE_MAX_SHARD + LARGE_LARGEST_BF16 + SLACK
    streamed = run_capped("stream", tmp_path, tokenizer_model, budget)
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert "converted within the cap" in streamed.stdout
    checkpoint_bytes = sum(p.stat().st_size for p in (tmp_path / "large").glob("*.pth"))
    assert checkpoint_bytes > 7 * budget
    written = sum(t.nbytes for t in read_output(tmp_path / "stream" / "hf").values())
    assert abs(2 * written - checkpoint_bytes) < MIB  # every tensor, in bfloat16

    # The cap has teeth: merging the checkpoint in memory, as the old converter did, fails under it.
    whole = run_capped("whole", tmp_path, tokenizer_model, budget)
    assert whole.returncode != 0
    assert "can't allocate memory" in whole.stderr or "MemoryError" in whole.stderr


def test_the_module_still_runs_as_a_command(make_checkpoint, tokenizer_model, tmp_path) -> None:
    src = make_checkpoint(GQA, n_shards=2)
    (src.parent / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference_demo.convert",
            str(src),
            str(tmp_path / "out"),
            "--dtype",
            "bfloat16",
            "--max-shard-gb",
            str(40 / (1 << 20)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {tmp_path / 'out'}" in result.stdout
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_key_value_heads"] == 2
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    }
