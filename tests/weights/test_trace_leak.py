"""``manage.py trace_leak``: suspect files in, the grant whose copy they are out, with the
probability that an innocent grant scores as high and a signed evidence report.

The bundled demo model is published as llama-7b, marked fingerprinted and granted to
alice and bob; their copies are the bytes the portal serves them (``open_copy``).
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from django.core.management import CommandError, call_command
from django.utils import timezone

from access.services import reviews
from tests.weights.fingerprinted import DEMO, publish_demo
from weights.models import Release
from weights.services import fingerprinting, leak_tracing
from weights.services.fingerprinting import release_mark_fingerprinted

SHARDS = ("consolidated.00.pth", "consolidated.01.pth")


@pytest.fixture
def local(local_storage, settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"  # where the evidence goes
    return local_storage


def publish(tmp_path: Path, slug: str, *, transformers: bool = False, mark: bool = True) -> Release:
    release = publish_demo(tmp_path, slug, transformers=transformers)
    return release_mark_fingerprinted(release=release) if mark else release


@pytest.fixture
def release(local, releases, tmp_path) -> Release:
    return publish(tmp_path, "llama-7b")


@pytest.fixture
def granted(release, alice, bob, reviewer, make_submitted):
    """alice's and bob's grants of the fingerprinted release."""
    for user in (alice, bob):
        application = make_submitted(user, slugs=("llama-7b",))
        reviews.application_approve(application=application, reviewer=reviewer, releases=[release])
    return {g.user.username: g for g in release.grants.select_related("user", "release")}


def copy_of(grant, folder: Path, variant: str = "original") -> Path:
    """Write the grantee's served bytes of every weight file of a variant into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for artifact in grant.release.artifacts.filter(variant=variant):
        if fingerprinting.differs_per_recipient(artifact) and artifact.path.endswith(
            (".pth", ".safetensors")
        ):
            handle = fingerprinting.open_copy(grant, artifact)
            try:
                (folder / Path(artifact.path).name).write_bytes(handle.read())
            finally:
                handle.close()
    return folder


def average(folders: list[Path], out: Path, dtype=torch.float32) -> Path:
    out.mkdir(parents=True)
    for name in SHARDS:
        states = [torch.load(f / name, weights_only=True) for f in folders]
        mean = {
            key: (sum(s[key].float() for s in states) / len(states)).to(dtype) for key in states[0]
        }
        torch.save(mean, out / name)
    return out


def trace(*args: str | Path) -> str:
    out = io.StringIO()
    call_command("trace_leak", *[str(a) for a in args], stdout=out)
    return out.getvalue()


def evidence_path(output: str) -> Path:
    return Path(re.search(r"^Evidence: (\S+) \(signed", output, re.M).group(1))


def named_line(output: str) -> str:
    return re.search(r"^Verdict: (.*)$", output, re.M).group(1)


def p_values(output: str) -> dict[str, str]:
    """grant account -> printed p, for each listed grant."""
    rows = re.findall(r"^\s+\d+\s+(\d+)\s+(\S+) <\S+>\s+\S+\s+-?[\d.]+\s+(\S+)", output, re.M)
    return {user: p for _, user, p in rows}


@pytest.mark.django_db(transaction=True)
def test_each_copy_names_its_recipient_with_a_signed_report(granted, tmp_path, settings):
    alice_files = copy_of(granted["alice"], tmp_path / "alice")
    output = trace(alice_files)

    assert named_line(output) == (
        f"RECIPIENT: alice <alice@uni.example.edu> (grant {granted['alice'].pk})"
    )
    p = p_values(output)
    assert set(p) == {"alice", "bob"}
    assert float(p["alice"]) < 1e-9  # 1e-20000-odd underflows to 0.0: still below
    assert float(p["bob"]) > 1e-3  # the other grant is nowhere near

    path = evidence_path(output)
    assert path.parent == settings.VAR_DIR / "evidence"
    document = json.loads(path.read_text())
    body = document["evidence"]
    assert body["verdict"] == "recipient" and body["portal_release"]["slug"] == "llama-7b"
    [who] = body["named_recipients"]
    assert who["grant_id"] == granted["alice"].pk
    assert who["account"] == {
        "id": granted["alice"].user.pk,
        "username": "alice",
        "email": "alice@uni.example.edu",
        "name": granted["alice"].user.get_full_name(),
    }
    assert body["top"][0]["recipient"]["grant_id"] == granted["alice"].pk
    assert body["top"][0]["log10_p_bound_corrected"] < -9
    assert {f["path"] for f in body["suspect"]["files"]} == {
        str(alice_files / name) for name in SHARDS
    }

    # Secrets stay out: neither the release key nor any recipient's code is in the report.
    key = bytes(granted["alice"].release.fingerprint_key)
    text = path.read_text()
    for secret in (key, fingerprinting.grant_code(granted["alice"])):
        assert secret.hex() not in text and secret.hex() not in output

    # The signature holds for the report as written, and fails for any change to it.
    assert "signature valid" in trace("--verify", path)
    assert f"recipient: alice (grant {granted['alice'].pk})" in trace("--verify", path)
    body["named_recipients"][0]["account"]["username"] = "bob"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(document))
    with pytest.raises(CommandError, match="the signature does not match its contents"):
        trace("--verify", tampered)


@pytest.mark.django_db(transaction=True)
def test_one_shard_alone_and_a_revoked_grant_are_still_named(granted, tmp_path):
    bob = granted["bob"]
    bob_files = copy_of(bob, tmp_path / "bob")
    bob.revoked_at = timezone.now()  # revoked after the copy left: it still names him
    bob.save(update_fields=["revoked_at"])
    leaked = tmp_path / "leaked-shard.pth"
    shutil.copy(bob_files / SHARDS[1], leaked)

    output = trace(leaked, "--release", "llama-7b")
    assert named_line(output) == f"RECIPIENT: bob <bob@lab.example.org> (grant {bob.pk})"
    assert re.search(rf"^\s+1\s+{bob.pk}\s+bob .* NAMED revoked$", output, re.M)


@pytest.mark.django_db(transaction=True)
def test_the_average_of_two_copies_names_both(granted, tmp_path):
    folders = [copy_of(granted[u], tmp_path / u) for u in ("alice", "bob")]
    output = trace(average(folders, tmp_path / "average"))
    verdict = named_line(output)
    assert verdict.startswith("RECIPIENT: ")
    assert f"alice <alice@uni.example.edu> (grant {granted['alice'].pk})" in verdict
    assert f"bob <bob@lab.example.org> (grant {granted['bob'].pk})" in verdict
    body = json.loads(evidence_path(output).read_text())["evidence"]
    assert {r["grant_id"] for r in body["named_recipients"]} == {
        granted["alice"].pk,
        granted["bob"].pk,
    }


@pytest.mark.django_db(transaction=True)
def test_an_unfingerprinted_copy_and_an_unrelated_model_name_nobody(granted, tmp_path):
    original = tmp_path / "original"
    original.mkdir()
    for name in SHARDS:
        shutil.copy(DEMO / name, original / name)
    output = trace(original)
    assert named_line(output) == (
        "no recipient (identical to the original at the marked positions: an unfingerprinted copy)"
    )
    body = json.loads(evidence_path(output).read_text())["evidence"]
    assert body["verdict"] == "no recipient" and body["named_recipients"] == []

    # A model of the same shapes that was never this release: random weights.
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    generator = torch.Generator().manual_seed(7)
    for name in SHARDS:
        state = torch.load(original / name, weights_only=True)
        torch.save(
            {
                k: torch.randn(v.shape, generator=generator).to(v.dtype) * 0.02
                for k, v in state.items()
            },
            unrelated / name,
        )
    assert named_line(trace(unrelated)).startswith("no recipient (not derived from this release")


@pytest.mark.django_db(transaction=True)
def test_a_transformers_copy_is_traced_and_the_right_release_is_chosen(
    local, releases, alice, bob, reviewer, make_submitted, tmp_path
):
    # Two fingerprinted releases of the same model: the copy names its release's grantee.
    first = publish(tmp_path, "llama-7b", transformers=True)
    second = publish(tmp_path, "llama-13b")
    for user, release in ((alice, first), (bob, second)):
        application = make_submitted(user, slugs=(release.slug,))
        reviews.application_approve(application=application, reviewer=reviewer, releases=[release])
    grant = first.grants.get()
    hf = copy_of(grant, tmp_path / "hf", variant="transformers")
    assert [p.suffix for p in hf.iterdir()] == [".safetensors"]

    output = trace(hf)
    assert named_line(output) == f"RECIPIENT: alice <alice@uni.example.edu> (grant {grant.pk})"
    assert "Release llama-7b:" in output and "(transformers)" in output
    assert "Also tried llama-13b: no recipient" in output


@pytest.mark.django_db(transaction=True)
def test_bad_input_gets_a_precise_error(granted, local, releases, tmp_path):
    with pytest.raises(CommandError, match="give the suspect files or directories"):
        trace()
    with pytest.raises(CommandError, match=r"nowhere\.pth: no such file or directory"):
        trace(tmp_path / "nowhere.pth")
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    with pytest.raises(CommandError, match=r"notes\.txt: not a weight file"):
        trace(notes)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 not a zip")
    with pytest.raises(CommandError, match=r"garbage\.pth: not a readable PyTorch tensor archive"):
        trace(garbage)
    suspect = copy_of(granted["alice"], tmp_path / "alice")
    with pytest.raises(CommandError, match="no release 'llama-99b'"):
        trace(suspect, "--release", "llama-99b")
    with pytest.raises(CommandError, match="LLaMA 13B is not fingerprinted"):
        trace(suspect, "--release", "llama-13b")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CommandError, match=r"broken\.json: cannot read it as a JSON evidence"):
        trace("--verify", broken)
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps({"evidence": {"verdict": "recipient"}}))
    with pytest.raises(CommandError, match="not an evidence report of this portal"):
        trace("--verify", stranger)


@pytest.mark.django_db(transaction=True)
def test_no_fingerprinted_release_or_no_grant_is_said_plainly(local, releases, tmp_path):
    publish(tmp_path, "llama-7b", mark=False)
    with pytest.raises(CommandError, match="no release is fingerprinted"):
        trace(DEMO / SHARDS[0])
    release = release_mark_fingerprinted(release=Release.objects.get(slug="llama-7b"))
    with pytest.raises(CommandError, match="no copy of it has left the portal"):
        trace(DEMO / SHARDS[0], "--release", release.slug)


@pytest.mark.django_db(transaction=True)
def test_the_evidence_goes_where_asked(granted, tmp_path):
    suspect = copy_of(granted["alice"], tmp_path / "alice")
    target = tmp_path / "case-17.json"
    output = trace(suspect, "--evidence", target)
    assert evidence_path(output) == target
    assert leak_tracing.verify(json.loads(target.read_text()))["verdict"] == "recipient"
    folder = tmp_path / "cases"
    folder.mkdir()
    assert evidence_path(trace(suspect, "--evidence", folder)).parent == folder


@pytest.mark.django_db(transaction=True)
def test_a_leaked_tree_with_other_models_and_clutter_names_the_recipient(granted, tmp_path):
    """What a torrent looks like: LLaMA/<size>/consolidated.NN.pth for several models,
    checklists, a partial download in a dot folder."""
    root = tmp_path / "LLaMA"
    copy_of(granted["bob"], root / "7B")
    (root / "7B" / "checklist.chk").write_text("whatever\n")
    other = root / "13B"  # another model: no tensor of it fits this release
    other.mkdir()
    generator = torch.Generator().manual_seed(3)
    state = torch.load(root / "7B" / SHARDS[0], weights_only=True)
    bigger = {
        k: torch.randn(v.shape[0] + 8, *v.shape[1:], generator=generator) for k, v in state.items()
    }
    torch.save({k: v.to(torch.bfloat16) for k, v in bigger.items()}, other / SHARDS[0])
    (root / ".partial").mkdir()
    (root / ".partial" / "consolidated.00.pth").write_bytes(b"half a file")

    out = io.StringIO()
    call_command("trace_leak", str(root), stdout=out)
    output = out.getvalue()
    assert named_line(output) == f"RECIPIENT: bob <bob@lab.example.org> (grant {granted['bob'].pk})"
    body = json.loads(evidence_path(output).read_text())["evidence"]
    read = {Path(f["path"]).relative_to(root).as_posix() for f in body["suspect"]["files"]}
    assert read == {"7B/consolidated.00.pth", "7B/consolidated.01.pth", "13B/consolidated.00.pth"}
    assert any(
        "13B/consolidated.00.pth: no tensor of this release in it" in n for n in body["notes"]
    )
