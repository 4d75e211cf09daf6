"""The download benchmark's fingerprinted measure, run for real on a tiny checkpoint: a
throw-away portal under gunicorn, the checkpoint published plain and fingerprinted, the
approval that prepares the grantee's copy, both files fetched over HTTP. Timings are not
asserted; every figure is there, the served bytes are the grantee's checksummed copy, and
--record writes the measure's block."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from weights.bench import FP_TARGET, checkpoint_shapes
from weights.fingerprint.keys import is_fingerprinted

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def bench(*args: str) -> subprocess.CompletedProcess:
    """`python -m weights.bench ARGS`, which must succeed."""
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "weights.bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("size_mb", [2, 384])
def test_checkpoint_shapes_are_llama_and_about_the_size_asked(size_mb) -> None:
    params, tensors = checkpoint_shapes(size_mb * MIB)
    size = 2 * sum(math.prod(shape) for _, shape in tensors)
    assert 0.75 * size_mb * MIB < size < 1.25 * size_mb * MIB
    names = [name for name, _ in tensors]
    assert names[0] == "tok_embeddings.weight" and names[-2:] == ["norm.weight", "output.weight"]
    assert f"layers.{params['n_layers'] - 1}.feed_forward.w2.weight" in names
    assert f"layers.{params['n_layers']}.attention.wq.weight" not in names
    marked = sum(math.prod(s) for n, s in tensors if is_fingerprinted(n, s))
    assert marked * 2 / size > 0.99  # nearly every byte is in a weight matrix


def test_fingerprinted_measure_reports_its_figures(tmp_path) -> None:
    record = tmp_path / "figures.md"
    record.write_text("# Figures\n\nprose kept\n")
    args = ["--only", "fingerprinted", "--size-mb", "2", "--runs", "2", "--record", str(record)]
    done = bench(*args)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["measured"] == ["fingerprinted"]
    f = out["fingerprinted"]
    assert 1.5 * MIB < f["file_bytes"] < 2.5 * MIB
    assert f["fingerprinted_bytes_fraction"] > 0.99
    assert f["plain_mb_s"] > 0 and f["fingerprinted_mb_s"] > 0
    assert f["ratio"] == pytest.approx(f["fingerprinted_mb_s"] / f["plain_mb_s"])
    assert f["ratio_per_pair_median"] > 0
    assert f["target"] == FP_TARGET == 0.5 and f["met"] == (f["ratio"] >= 0.5)
    assert f["sha256_matches_recipient_copy"] is True
    assert f["differs_from_published"] is True
    assert f["plain_sha256_matches_published"] is True
    assert set(f["server_cpu_s_per_gb"]) == {"plain", "fingerprinted"}
    assert f["approve_and_prepare_s"] > 0
    assert len(out["seconds"]["plain_http"]) == len(out["seconds"]["fingerprinted_http"]) == 2
    assert "fingerprinted checkpoint" in done.stdout and "RecipientCopy.sha256: True" in done.stdout

    text = record.read_text()
    assert text.startswith("# Figures\n\nprose kept\n")
    block = text.split("<!-- bench:fingerprinted:begin -->", 1)[1]
    block = block.split("<!-- bench:fingerprinted:end -->", 1)[0]
    assert f"published plain and fingerprinted; medians of {out['runs']} runs each" in block
    assert f"{f['file_bytes']} bytes" in block and "RecipientCopy.sha256: True" in block


def test_materialised_copies_are_measured_as_stored_files(tmp_path) -> None:
    args = ["--only", "fingerprinted", "--size-mb", "2", "--runs", "1", "--materialise", "--keep"]
    done = bench(*args)
    root = Path(re.search(r"setting up a portal under (\S+) \.\.\.", done.stderr).group(1))
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert out["materialised"] is True and "(copies materialised)" in done.stdout
        assert out["fingerprinted"]["sha256_matches_recipient_copy"] is True
        # The grantee's copy was written out under the storage root, whole.
        [copy] = [p for p in (root / "storage" / "fingerprinted").rglob("*.pth")]
        assert copy.stat().st_size == out["fingerprinted"]["file_bytes"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
