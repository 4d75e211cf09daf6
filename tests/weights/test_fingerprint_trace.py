"""Tracing a leaked copy to its recipient: every layout, the controls, and the bound.

A tiny random bf16 release in two model-parallel shards; recipients' copies from the
reference embedder (``weights.fingerprint.perturb``); suspects built with the project's own
converter and checkpoint writer.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_demo.convert import permute_rotary
from inference_demo.llama.checkpoint import load_state_dict, save_checkpoint
from weights.fingerprint import perturb
from weights.fingerprint import trace as tr
from weights.fingerprint.keys import directions, marked, recipient_code
from weights.fingerprint_bench import TOKENIZER, average, cast, quantize, random_tensors

KEY = hashlib.sha256(b"test release key").digest()
PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16)
GRANTS = range(1, 51)


def grant(i: int) -> str:
    return f"grant {i}"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fingerprint")
    original = root / "original"
    save_checkpoint(original, PARAMS, dict(random_tensors(PARAMS, seed=3)), n_shards=2)
    copies = {
        g: perturb.write_recipient_copy(original, root / f"r{g}", KEY, recipient_code(KEY, g))
        for g in (7, 8)
    }
    return {"root": root, "original": original, "r7": copies[7], "r8": copies[8]}


@pytest.fixture(scope="module")
def marks(release: dict[str, Path]) -> tr.ReleaseMarks:
    return tr.release_marks(release["original"], KEY)


@pytest.fixture(scope="module")
def candidates() -> dict[str, bytes]:
    return {grant(i): recipient_code(KEY, i) for i in GRANTS}


def run(paths, release, marks, candidates, **options) -> tr.TraceResult:
    return tr.trace(paths, release["original"], KEY, candidates, marks=marks, **options)


def assert_names(result: tr.TraceResult, *grants: int) -> None:
    want = [grant(g) for g in grants]
    assert result.verdict == "recipient"
    assert sorted(result.named) == sorted(want)
    assert sorted(c.label for c in result.candidates[: len(want)]) == sorted(want)
    for label in want:
        assert result.candidate(label).log10_p_corrected < -9
    innocent = result.candidates[len(want)]
    assert innocent.p_corrected > 1e-3  # the best innocent is unremarkable


# The reference embedder: what a recipient's copy is.


def bf16_bits(values: list[int]) -> torch.Tensor:
    return torch.tensor(np.array(values, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


def test_nudge_moves_one_ulp_and_skips_the_edges() -> None:
    fmt = perturb.FORMATS[torch.bfloat16]
    # 1.0, -1.0, +0, -0, a subnormal, inf, nan, largest finite, smallest normal, -smallest
    bits = np.array(
        [0x3F80, 0xBF80, 0x0000, 0x8000, 0x0001, 0x7F80, 0x7FC0, 0x7F7F, 0x0080, 0x8080],
        dtype=np.uint16,
    )
    up = perturb.nudge(bits, fmt, np.ones(len(bits), dtype=bool))
    down = perturb.nudge(bits, fmt, np.zeros(len(bits), dtype=bool))
    assert [hex(b) for b in up] == [
        "0x3f81", "0xbf7f", "0x0", "0x8000", "0x1", "0x7f80", "0x7fc0", "0x7f7f", "0x81", "0x8080",
    ]  # fmt: skip
    assert [hex(b) for b in down] == [
        "0x3f7f", "0xbf81", "0x0", "0x8000", "0x1", "0x7f80", "0x7fc0", "0x7f7e", "0x80", "0x8081",
    ]  # fmt: skip
    values = perturb.bits_to_float32(bits[:2], fmt)
    assert perturb.bits_to_float32(up[:2], fmt)[0] > values[0]  # numerically up, both signs
    assert perturb.bits_to_float32(up[:2], fmt)[1] > values[1]


def test_recipient_copy_differs_at_marked_positions_by_one_ulp(release) -> None:
    _, original = load_state_dict(release["original"], verify=False)
    _, copy = load_state_dict(release["r7"], verify=False)
    code = recipient_code(KEY, 7)
    for name, before in original.items():
        after = copy[name]
        if before.ndim != 2:
            assert torch.equal(before, after), name  # norms stay exact
            continue
        index = np.arange(before.numel())
        changed = (before != after).reshape(-1).numpy()
        mark = marked(KEY, name, index)
        assert not (changed & ~mark).any(), name  # only marked positions change
        assert changed.sum() > 0.99 * mark.sum(), name  # and nearly all of them do
        d = (after.float() - before.float()).reshape(-1).numpy()[changed]
        assert (np.sign(d) == directions(code, name, index[changed])).all(), name
        ulp = tr.ulp_of(perturb.tensor_bits(before)[changed], perturb.FORMATS[torch.bfloat16])
        # One unit in the last place: half of one when the magnitude drops a binade.
        assert np.all((np.abs(d) == ulp) | (np.abs(d) == ulp / 2)), name


# Naming the recipient from each kind of copy.


def test_exact_copy_names_its_recipient_with_evidence(release, marks, candidates) -> None:
    result = run([release["r7"]], release, marks, candidates)
    assert_names(result, 7)
    assert result.positions["held_by_suspect"] == marks.n_positions
    assert {f.layout for f in result.suspect_files} == {"meta"}
    evidence = json.loads(tr.dumps(tr.evidence_json(result)))
    files = {Path(f["path"]).name: f["sha256"] for f in evidence["suspect"]["files"]}
    for name, digest in files.items():
        assert digest == hashlib.sha256((release["r7"] / name).read_bytes()).hexdigest()
    assert evidence["named"] == [grant(7)]
    assert evidence["top"][0]["label"] == grant(7)
    assert evidence["release"]["key_id"] == tr.key_id(KEY)
    assert evidence["candidates_scored"] == len(GRANTS)
    text = tr.dumps(evidence)
    assert KEY.hex() not in text and recipient_code(KEY, 7).hex() not in text


def test_one_shard_alone_names_its_recipient(release, marks, candidates) -> None:
    shard = release["r7"] / "consolidated.01.pth"
    result = run([shard], release, marks, candidates)
    assert_names(result, 7)
    assert 0.4 < result.positions["held_by_suspect"] / marks.n_positions < 0.6
    assert result.suspect_files[0].detail["shard_index"] == 1
    assert result.suspect_files[0].layout == "meta-shard"
    # Renamed, the shard is placed by matching it against the original's slices.
    renamed = release["root"] / "leak.pth"
    shutil.copyfile(shard, renamed)
    result = run([renamed], release, marks, candidates)
    assert_names(result, 7)
    assert result.suspect_files[0].detail["shard_index"] == 1
    assert result.suspect_files[0].detail["shard_index_by"] == "best match"


def test_transformers_conversion_names_its_recipient(release, marks, candidates) -> None:
    from inference_demo.convert import convert

    hf = convert(release["r7"], release["root"] / "hf7", tokenizer=TOKENIZER, verify=False)
    result = run([hf], release, marks, candidates)
    assert_names(result, 7)
    assert result.suspect_files[0].layout == "transformers"
    assert result.positions["held_by_suspect"] == marks.n_positions
    exact = run([release["r7"]], release, marks, candidates)
    assert result.candidate(grant(7)).score == pytest.approx(exact.candidate(grant(7)).score)
    # Both layouts of one copy: each position counts once, the second reading is noted.
    both = run([hf, release["r7"]], release, marks, candidates)
    assert both.positions["held_by_suspect"] == marks.n_positions
    assert both.candidate(grant(7)).score == pytest.approx(exact.candidate(grant(7)).score)
    assert any("overlaps one read before" in note for note in both.notes)


def test_fp32_cast_and_int8_quantization_name_the_recipient(release, marks, candidates) -> None:
    fp32 = cast(release["r7"], release["root"] / "fp32", torch.float32)
    assert_names(run(fp32, release, marks, candidates), 7)
    int8 = quantize(release["r7"], release["root"] / "int8")
    assert_names(run(int8, release, marks, candidates), 7)


def test_average_of_two_copies_names_both(release, marks, candidates) -> None:
    paths = average([release["r7"], release["r8"]], release["root"] / "avg")
    assert_names(run(paths, release, marks, candidates), 7, 8)


def test_two_stage_scoring_confirms_on_disjoint_positions(release, marks, candidates) -> None:
    result = run([release["r7"]], release, marks, candidates, screen_positions=2048, confirm_top=3)
    assert_names(result, 7)
    best = result.candidate(grant(7))
    assert best.stage == "confirm" and best.screen_score is not None
    assert {c.stage for c in result.candidates} == {"confirm", "screen"}
    positions = result.positions
    assert positions["screen"] + positions["confirm"] == positions["held_by_suspect"]
    assert sum(c.stage == "confirm" for c in result.candidates) == 3


# Nobody is named where nobody's copy is.


def test_unfingerprinted_copy_names_nobody(release, marks, candidates) -> None:
    result = run([release["original"]], release, marks, candidates)
    assert result.verdict == "no recipient" and result.named == []
    assert "unfingerprinted" in result.reason
    assert all(c.score == 0.0 for c in result.candidates)


def test_unrelated_model_names_nobody(release, marks, candidates) -> None:
    other = release["root"] / "unrelated"
    save_checkpoint(other, PARAMS, dict(random_tensors(PARAMS, seed=4)), n_shards=2)
    result = run([other], release, marks, candidates)
    assert result.verdict == "no recipient" and result.named == []
    assert not result.derived and "not derived from this release" in result.reason
    assert result.candidates[0].p_corrected > 1e-3


def test_another_architecture_names_nobody(release, marks, candidates) -> None:
    params = {**PARAMS, "dim": 32, "n_heads": 2, "n_kv_heads": 1}
    other = release["root"] / "other-architecture"
    save_checkpoint(other, params, dict(random_tensors(params, seed=5)), n_shards=1)
    result = run([other], release, marks, candidates)
    assert result.verdict == "no recipient" and result.named == []
    assert "not derived from this release" in result.reason
    assert result.positions["held_by_suspect"] < marks.n_positions


def test_innocent_probability_bound_holds_empirically(release, marks) -> None:
    """2,000 innocent codes against a recipient's copy: the share scoring at least t stays
    under exp(-t^2/2), and the scores look standard normal."""
    suspect = tr.open_suspect([release["r7"]], marks)
    rows, _, _ = tr.collect(suspect, marks)
    codes = [recipient_code(KEY, 10_000 + i) for i in range(2000)]
    scores = tr.scores(rows, codes)
    assert abs(scores.mean()) < 0.1 and 0.9 < scores.std() < 1.1
    for t in (1.0, 1.5, 2.0, 2.5, 3.0):
        bound = math.exp(-t * t / 2)
        share = float((scores >= t).mean())
        assert share <= bound + 3 * math.sqrt(bound / len(codes)), (t, share, bound)
        assert 10 ** tr.log10_p_bound(t) == pytest.approx(bound)
    # The recipient's own code, for scale.
    assert tr.scores(rows, [recipient_code(KEY, 7)])[0] > 50


# Mapping and input errors.


def test_unpermute_undoes_the_converters_rotary_permutation() -> None:
    w = torch.arange(32 * 3, dtype=torch.float32).view(32, 3)
    assert torch.equal(tr.unpermute_rotary(permute_rotary(w, 4), 4), w)


def test_bad_input_gets_a_precise_error(release, marks, candidates, tmp_path) -> None:
    with pytest.raises(tr.TraceError, match="no such file or directory"):
        run([tmp_path / "missing"], release, marks, candidates)
    with pytest.raises(tr.TraceError, match="no weight files"):
        run([tmp_path], release, marks, candidates)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(tr.TraceError, match="not a weight file"):
        run([notes], release, marks, candidates)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a zip")
    with pytest.raises(tr.TraceError, match="damaged.pth"):
        run([damaged], release, marks, candidates)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copyfile(release["r7"] / "consolidated.00.pth", mixed / "consolidated.00.pth")
    small = {**PARAMS, "dim": 32, "n_heads": 2, "n_kv_heads": 1}
    save_checkpoint(tmp_path / "small", small, dict(random_tensors(small, seed=6)))
    shutil.copyfile(tmp_path / "small" / "consolidated.00.pth", mixed / "consolidated.01.pth")
    with pytest.raises(tr.TraceError, match="shards do not fit together"):
        run([mixed], release, marks, candidates)
    with pytest.raises(tr.TraceError, match="no candidates"):
        run([release["r7"]], release, marks, {})
    with pytest.raises(tr.TraceError, match="another release or key"):
        tr.trace([release["r7"]], release["original"], b"x" * 32, candidates, marks=marks)
