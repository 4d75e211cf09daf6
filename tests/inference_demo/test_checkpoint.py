from __future__ import annotations

import json
import pathlib

import pytest
import torch

from inference_demo.llama import checkpoint as ckpt
from inference_demo.llama.model import ModelArgs

from .conftest import GQA, random_state_dict


def test_split_follows_meta_model_parallel_layout() -> None:
    state = random_state_dict(GQA)
    shards = ckpt.split_state_dict(state, 2)
    args = ModelArgs.from_params(GQA)
    first = shards[0]
    assert first["layers.0.attention.wq.weight"].shape == (args.dim // 2, args.dim)
    assert first["layers.0.attention.wk.weight"].shape == (args.head_dim, args.dim)
    assert first["layers.0.attention.wo.weight"].shape == (args.dim, args.dim // 2)
    assert first["layers.0.feed_forward.w1.weight"].shape == (args.hidden_dim // 2, args.dim)
    assert first["layers.0.feed_forward.w2.weight"].shape == (args.dim, args.hidden_dim // 2)
    assert first["tok_embeddings.weight"].shape == (args.vocab_size, args.dim // 2)
    assert first["output.weight"].shape == (args.vocab_size // 2, args.dim)
    assert torch.equal(first["norm.weight"], shards[1]["norm.weight"])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_merge_inverts_split(n: int) -> None:
    state = random_state_dict(GQA)
    merged = ckpt.merge_shards(ckpt.split_state_dict(state, n), GQA["dim"])
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[k], state[k]) for k in state)


def test_merge_detects_vocab_split_embedding_and_ignores_rope_freqs() -> None:
    state = random_state_dict(GQA)
    shards = ckpt.split_state_dict(state, 2)
    emb = state["tok_embeddings.weight"]
    for shard, part in zip(shards, emb.chunk(2, dim=0), strict=True):
        shard["tok_embeddings.weight"] = part  # LLaMA 3 layout
        shard["rope.freqs"] = torch.ones(4)
    merged = ckpt.merge_shards(shards, GQA["dim"])
    assert torch.equal(merged["tok_embeddings.weight"], emb)
    assert "rope.freqs" not in merged


def test_load_model_from_two_shards(make_checkpoint) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    assert sorted(p.name for p in directory.iterdir()) == [
        "checklist.chk",
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
    ]
    model = ckpt.load_model(directory)
    expected = random_state_dict(GQA)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert not any(p.is_meta for p in model.parameters())


def test_vocab_size_minus_one_comes_from_the_embedding(make_checkpoint) -> None:
    directory = make_checkpoint(GQA)
    params = json.loads((directory / "params.json").read_text())
    (directory / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    args, _ = ckpt.load_state_dict(directory, verify=False)
    assert args.vocab_size == GQA["vocab_size"]


def test_missing_shard_named_by_checklist(make_checkpoint) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    (directory / "consolidated.01.pth").unlink()
    with pytest.raises(ckpt.MissingShardError, match=r"consolidated\.01\.pth is missing"):
        ckpt.load_model(directory)


def test_missing_shard_gap_without_checklist(make_checkpoint) -> None:
    directory = make_checkpoint(GQA, n_shards=4)
    (directory / "checklist.chk").unlink()
    (directory / "consolidated.02.pth").unlink()
    with pytest.raises(ckpt.MissingShardError, match=r"consolidated\.02\.pth is missing"):
        ckpt.load_model(directory)


def test_no_shards_at_all(tmp_path: pathlib.Path) -> None:
    (tmp_path / "params.json").write_text(json.dumps(GQA))
    with pytest.raises(ckpt.MissingShardError, match="no consolidated"):
        ckpt.load_model(tmp_path)


def test_not_a_checkpoint(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="no params.json"):
        ckpt.load_model(tmp_path)


def test_checksum_failure(make_checkpoint) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    with (directory / "consolidated.01.pth").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ckpt.ChecksumError, match=r"MD5 mismatch for consolidated\.01\.pth"):
        ckpt.load_model(directory)


def test_checklist_is_md5sum_format(make_checkpoint) -> None:
    import hashlib

    directory = make_checkpoint(GQA, n_shards=2)
    lines = (directory / "checklist.chk").read_text().splitlines()
    digest = hashlib.md5((directory / "params.json").read_bytes()).hexdigest()
    assert f"{digest}  params.json" in lines
    assert len(lines) == 3


def test_shape_mismatch_between_params_and_weights(make_checkpoint) -> None:
    directory = make_checkpoint(GQA)
    (directory / "params.json").write_text(json.dumps({**GQA, "multiple_of": 64}))
    with pytest.raises(ckpt.ShapeMismatchError, match=r"feed_forward\.w1\.weight"):
        ckpt.load_model(directory, verify=False)


def test_shards_disagree_on_a_replicated_tensor(make_checkpoint) -> None:
    directory = make_checkpoint(GQA, n_shards=2)
    shard = torch.load(directory / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = torch.ones(3)
    torch.save(shard, directory / "consolidated.01.pth")
    with pytest.raises(ckpt.ShapeMismatchError, match="norm.weight: shards disagree"):
        ckpt.load_model(directory, verify=False)


class _Exploit:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


def test_refuses_a_pickle_that_runs_code(make_checkpoint, tmp_path: pathlib.Path) -> None:
    directory = make_checkpoint(GQA)
    marker = tmp_path / "pwned"
    state = torch.load(directory / "consolidated.00.pth", weights_only=True)
    torch.save({**state, "payload": _Exploit(marker)}, directory / "consolidated.00.pth")
    with pytest.raises(ckpt.UnsafeCheckpointError, match="refused to load"):
        ckpt.load_model(directory, verify=False)
    assert not marker.exists()


def test_truncated_shard_is_a_clear_error(make_checkpoint) -> None:
    directory = make_checkpoint(GQA)
    shard = directory / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match="not a readable PyTorch tensor archive"):
        ckpt.load_model(directory, verify=False)


def test_malformed_checklist(make_checkpoint) -> None:
    directory = make_checkpoint(GQA)
    (directory / "checklist.chk").write_text("not a checksum line\n")
    with pytest.raises(ckpt.ChecksumError, match="line 1 is not"):
        ckpt.load_model(directory)
