"""Loading without copies, verify-once checksums, and the checks that keep a checkpoint honest.

Memory is capped by the kernel, as in test_convert_streaming: a subprocess sets RLIMIT_DATA
(every malloc and private mapping, the memory-mapped shards included) to what the shard-by-shard
load needs; it must fit, and the torch.cat merge it replaced must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from inference_demo.llama import checkpoint as ckpt
from inference_demo.load_bench import cat_load
from tests.servers import ROOT

from .conftest import GQA, MHA, random_state_dict

MIB = 1 << 20
# ~23M parameters, 92 MB in float32 over two shards of 46 MB.
LARGE = dict(
    dim=512, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=256, norm_eps=1e-5
)
SLACK = 8 * MIB


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "verified.json"


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file md5_file reads, in order."""
    calls: list[Path] = []
    real = ckpt.md5_file

    def counting(path: Path, chunk: int = 1 << 20) -> str:
        calls.append(path)
        return real(path, chunk)

    monkeypatch.setattr(ckpt, "md5_file", counting)
    return calls


# Loading shard by shard


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n_shards", [2, 4])
@pytest.mark.parametrize("params", [MHA, GQA], ids=["mha", "gqa"])
def test_merged_weights_equal_the_torch_cat_merge(
    make_checkpoint, params, n_shards, dtype, cache
) -> None:
    directory = make_checkpoint(params, n_shards=n_shards)
    model = ckpt.load_model(directory, dtype=dtype, verify_cache=cache)
    reference = cat_load(directory, dtype).state_dict()
    expected = random_state_dict(params)
    got = model.state_dict()
    assert got.keys() == reference.keys() == expected.keys()
    for key, tensor in got.items():
        assert tensor.dtype == dtype and not tensor.is_meta, key
        assert torch.equal(tensor, reference[key]), key
        assert torch.equal(tensor, expected[key].to(dtype)), key
    assert not any(p.requires_grad for p in model.parameters())


def test_vocab_split_embedding_loads_like_llama3(make_checkpoint, cache) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    state = random_state_dict(GQA)
    for i, part in enumerate(state["tok_embeddings.weight"].chunk(2, dim=0)):
        path = directory / f"consolidated.{i:02d}.pth"
        shard = torch.load(path, weights_only=True)
        shard["tok_embeddings.weight"] = part.clone()
        shard["rope.freqs"] = torch.ones(4)
        torch.save(shard, path)
    model = ckpt.load_model(directory, verify=False)
    assert torch.equal(model.state_dict()["tok_embeddings.weight"], state["tok_embeddings.weight"])


def test_merge_shards_allocates_each_tensor_once_without_cat(monkeypatch) -> None:
    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat of a whole tensor")

    monkeypatch.setattr(torch, "cat", no_cat)
    state = random_state_dict(GQA)
    merged = ckpt.merge_shards(ckpt.split_state_dict(state, 4), GQA["dim"])
    assert all(torch.equal(merged[k], state[k]) for k in state)


CAPPED = textwrap.dedent(
    """
    import re, resource, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)  # no worker-thread stacks appearing mid-run
    from inference_demo.llama.checkpoint import load_model
    from inference_demo.load_bench import cat_load

    src, warm, mode, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    dtype, budget = getattr(torch, dtype), int(sys.argv[5])
    load_model(warm, dtype=dtype, verify=False)
    cat_load(warm, dtype)

    def vm_data() -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmData:\\s+(\\d+) kB", status).group(1)) * 1024

    resource.setrlimit(resource.RLIMIT_DATA, (vm_data() + budget, resource.RLIM_INFINITY))
    if mode == "shard-by-shard":
        model = load_model(src, dtype=dtype, verify=False)
    else:
        model = cat_load(src, dtype)
    print("loaded within the cap", sum(p.numel() for p in model.parameters()))
    """
)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("large")
    ckpt.save_checkpoint(root / "large", LARGE, random_state_dict(LARGE), n_shards=2)
    ckpt.save_checkpoint(root / "warm", MHA, random_state_dict(MHA), n_shards=2)
    return root / "large", root / "warm"


def run_capped(mode: str, large: tuple[Path, Path], dtype: str, budget: int):
    src, warm = large
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", CAPPED, str(src), str(warm), mode, dtype, str(budget)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_private_memory_capped_at_the_model_plus_one_shard(large, dtype) -> None:
    src, _ = large
    shards = sorted(src.glob("consolidated.*.pth"))
    checkpoint_bytes = sum(p.stat().st_size for p in shards)
    n_params = sum(t.numel() for t in random_state_dict(LARGE).values())
    model_bytes = n_params * getattr(torch, dtype).itemsize
    # Opening maps every shard (reading none); filling maps one shard at a time beside the model.
    budget = max(checkpoint_bytes, model_bytes + max(p.stat().st_size for p in shards)) + SLACK
    loaded = run_capped("shard-by-shard", large, dtype, budget)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["loaded", "within", "the", "cap", str(n_params)]

    # The cap has teeth: the torch.cat merge (all shards mapped + the concatenation + the cast
    # to bfloat16, if any) does not fit in it.
    merged = run_capped("torch.cat", large, dtype, budget)
    assert merged.returncode != 0
    assert "can't allocate memory" in merged.stderr or "MemoryError" in merged.stderr


# Verify once


def test_second_load_does_not_hash(make_checkpoint, cache, hashed) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    hashed.clear()  # writing the checklist hashed them
    ckpt.load_model(directory, verify_cache=cache)
    assert sorted(p.name for p in hashed) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
    ]
    entries = json.loads(cache.read_text())["files"]
    shard = directory / "consolidated.01.pth"
    st = shard.stat()
    assert entries[str(shard.resolve())] == {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
        "md5": ckpt.md5_file(shard),
    }
    hashed.clear()
    ckpt.load_model(directory, verify_cache=cache)
    ckpt.open_checkpoint(directory, verify_cache=cache)  # the converter's road, too
    assert hashed == []


def test_touched_file_is_hashed_again(make_checkpoint, cache, hashed) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    ckpt.load_model(directory, verify_cache=cache)
    hashed.clear()
    shard = directory / "consolidated.01.pth"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    ckpt.load_model(directory, verify_cache=cache)
    assert [p.name for p in hashed] == ["consolidated.01.pth"]
    hashed.clear()
    ckpt.load_model(directory, verify_cache=cache)
    assert hashed == []  # the new identity was remembered


def test_replaced_file_with_same_size_and_mtime_is_hashed_again(
    make_checkpoint, cache, hashed
) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    ckpt.load_model(directory, verify_cache=cache)
    shard = directory / "consolidated.00.pth"
    st = shard.stat()
    copy = directory / "copy.tmp"
    copy.write_bytes(shard.read_bytes())
    os.replace(copy, shard)  # a new inode: e.g. a re-download moved into place
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_ino != st.st_ino and shard.stat().st_size == st.st_size
    hashed.clear()
    ckpt.load_model(directory, verify_cache=cache)
    assert [p.name for p in hashed] == ["consolidated.00.pth"]


def test_corrupted_file_fails_and_is_never_cached(make_checkpoint, cache, hashed) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    ckpt.load_model(directory, verify_cache=cache)
    shard = directory / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, new mtime
    shard.write_bytes(bytes(data))
    for _ in range(2):  # the failure is not remembered as verified
        hashed.clear()
        with pytest.raises(ckpt.ChecksumError, match=r"MD5 mismatch for consolidated\.01\.pth"):
            ckpt.load_model(directory, verify_cache=cache)
        assert [p.name for p in hashed] == ["consolidated.01.pth"]
    entry = json.loads(cache.read_text())["files"][str(shard.resolve())]
    assert entry["mtime_ns"] != shard.stat().st_mtime_ns  # still the good file's identity


def test_checklist_change_is_verified_again(make_checkpoint, cache, hashed) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    ckpt.load_model(directory, verify_cache=cache)
    checklist = directory / "checklist.chk"
    lines = checklist.read_text().replace(ckpt.md5_file(directory / "params.json"), "0" * 32)
    checklist.write_text(lines)
    hashed.clear()
    with pytest.raises(ckpt.ChecksumError, match=r"MD5 mismatch for params\.json"):
        ckpt.load_model(directory, verify_cache=cache)


def test_damaged_cache_is_ignored(make_checkpoint, cache, hashed) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    hashed.clear()
    cache.write_text("{not json")
    ckpt.load_model(directory, verify_cache=cache)
    assert len(hashed) == 3
    assert len(json.loads(cache.read_text())["files"]) == 3


def test_default_cache_location(monkeypatch, tmp_path) -> None:
    from django.conf import settings

    monkeypatch.delenv(ckpt.VERIFY_CACHE_ENV, raising=False)
    assert ckpt.default_verify_cache() == Path(settings.VAR_DIR) / ckpt.VERIFY_CACHE_NAME
    monkeypatch.setattr(settings, "INFERENCE_VERIFY_CACHE", tmp_path / "s.json", raising=False)
    assert ckpt.default_verify_cache() == tmp_path / "s.json"
    monkeypatch.setenv(ckpt.VERIFY_CACHE_ENV, str(tmp_path / "e.json"))
    assert ckpt.default_verify_cache() == tmp_path / "e.json"


# Shard key sets and params.json


def rewrite_shard(directory: Path, index: int, edit) -> None:
    path = directory / f"consolidated.{index:02d}.pth"
    shard = torch.load(path, weights_only=True)
    edit(shard)
    torch.save(shard, path)


@pytest.mark.parametrize("load", [ckpt.load_model, ckpt.load_state_dict, ckpt.open_checkpoint])
def test_key_missing_from_one_shard(make_checkpoint, load) -> None:
    directory = make_checkpoint(GQA, n_shards=4)
    rewrite_shard(directory, 2, lambda s: s.pop("layers.1.attention.wk.weight"))
    message = (
        r"^layers\.1\.attention\.wk\.weight: missing from consolidated\.02\.pth \(present in "
        r"consolidated\.00\.pth, consolidated\.01\.pth, consolidated\.03\.pth\)$"
    )
    with pytest.raises(ckpt.ShardKeysError, match=message):
        load(directory, verify=False)


@pytest.mark.parametrize("load", [ckpt.load_model, ckpt.load_state_dict, ckpt.open_checkpoint])
def test_key_only_in_a_later_shard(make_checkpoint, load) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    rewrite_shard(directory, 1, lambda s: s.update({"layers.0.extra.weight": torch.ones(2)}))
    message = (
        r"^layers\.0\.extra\.weight: missing from consolidated\.00\.pth "
        r"\(present in consolidated\.01\.pth\)$"
    )
    with pytest.raises(ckpt.ShardKeysError, match=message):
        load(directory, verify=False)


def test_merge_shards_names_shards_by_index() -> None:
    shards = ckpt.split_state_dict(random_state_dict(GQA), 2)
    del shards[0]["norm.weight"]
    with pytest.raises(ckpt.ShardKeysError, match=r"norm\.weight: missing from shard 0"):
        ckpt.merge_shards(shards, GQA["dim"])


def write_params(directory: Path, **changes) -> None:
    params = json.loads((directory / "params.json").read_text())
    (directory / "params.json").write_text(json.dumps({**params, **changes}))


def test_scaled_rope_is_refused(make_checkpoint) -> None:
    directory = make_checkpoint(GQA)
    write_params(directory, use_scaled_rope=True)
    with pytest.raises(ckpt.ParamsError, match=r"use_scaled_rope=True, which is not supported"):
        ckpt.load_model(directory, verify=False)


def test_scaled_rope_off_is_plain_rope(make_checkpoint) -> None:
    directory = make_checkpoint(GQA)
    write_params(directory, use_scaled_rope=False)
    model = ckpt.load_model(directory, verify=False)
    assert model.args.rope_theta == GQA["rope_theta"]


def test_unknown_key_is_refused(make_checkpoint) -> None:
    directory = make_checkpoint(GQA)
    write_params(directory, rope_scaling={"factor": 8.0})
    with pytest.raises(ckpt.ParamsError, match=r"unknown params\.json key 'rope_scaling'"):
        ckpt.load_model(directory, verify=False)


def test_missing_and_malformed_params(make_checkpoint) -> None:
    directory = make_checkpoint(GQA)
    params = json.loads((directory / "params.json").read_text())
    del params["n_heads"]
    (directory / "params.json").write_text(json.dumps(params))
    with pytest.raises(ckpt.ParamsError, match=r"params\.json lacks 'n_heads'"):
        ckpt.load_model(directory, verify=False)
    (directory / "params.json").write_text("[1, 2]")
    with pytest.raises(ckpt.ParamsError, match=r"params\.json is not a JSON object"):
        ckpt.load_model(directory, verify=False)


def test_llama1_and_serving_keys_are_accepted(make_checkpoint) -> None:
    """LLaMA 1's params.json: vocab_size -1; some forks add max_batch_size and max_seq_len."""
    directory = make_checkpoint(MHA, n_shards=2)
    write_params(directory, vocab_size=-1, max_batch_size=32, max_seq_len=2048)
    model = ckpt.load_model(directory, verify=False, max_seq_len=128)
    assert model.args.vocab_size == MHA["vocab_size"] and model.args.max_seq_len == 128


def test_the_demo_model_params_are_accepted(demo_dir) -> None:
    params = ckpt.read_params(demo_dir)
    assert set(params) <= ckpt.SUPPORTED_PARAMS and params["dim"] == 256
