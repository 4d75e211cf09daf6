"""A fingerprinted release: each grantee's files are their own, checksummed before the link
goes out, served consistently for whole files and any range, and verified by their tools.

The bundled demo model (bfloat16, two model-parallel shards) is published as llama-7b on
local storage, marked fingerprinted, and granted to two researchers.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from django.core import mail

from access.services import reviews
from tests.conftest import require_tools
from tests.weights.clients import run_download_sh
from tests.weights.fingerprinted import DEMO, approve, publish_demo
from weights.models import Artifact, RecipientCopy, Release
from weights.services import links
from weights.services.fingerprinting import (
    ALREADY_GRANTED,
    FingerprintRefused,
    grant_code,
    release_mark_fingerprinted,
)

ROOT = Path(__file__).resolve().parents[2]
SHARD = "consolidated.00.pth"


@pytest.fixture
def local(local_storage):
    return local_storage


@pytest.fixture
def release(local, releases, tmp_path) -> Release:
    return release_mark_fingerprinted(release=publish_demo(tmp_path))


def artifact(release: Release, path: str) -> Artifact:
    return release.artifacts.get(path=path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def one_ulp_apart(original: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    bits = original.view(torch.int16).int() - copy.view(torch.int16).int()
    return bits.abs()


@pytest.mark.django_db(transaction=True)
def test_each_grantee_gets_their_own_verified_copy(
    client, release, alice, bob, reviewer, make_submitted, caplog
):
    caplog.set_level(logging.DEBUG)
    alice_token = approve(alice, make_submitted, reviewer, release)
    bob_token = approve(bob, make_submitted, reviewer, release)
    shard = artifact(release, SHARD)

    # Checksums of the three files that differ per recipient were ready before the mail.
    for user in (alice, bob):
        copies = RecipientCopy.objects.filter(grant__user=user, state="ready")
        assert sorted(c.artifact.path for c in copies) == [
            "checklist.chk",
            "consolidated.00.pth",
            "consolidated.01.pth",
        ]

    alice_bytes = b"".join(client.get(f"/d/{alice_token}/{SHARD}").streaming_content)
    bob_bytes = b"".join(client.get(f"/d/{bob_token}/{SHARD}").streaming_content)
    alice_copy = RecipientCopy.objects.get(grant__user=alice, artifact=shard)
    assert len(alice_bytes) == len(bob_bytes) == shard.size
    assert sha256(alice_bytes) == alice_copy.sha256 != shard.sha256
    assert sha256(bob_bytes) != sha256(alice_bytes)

    # Any range is the same bytes as the whole file: resumes and parallel clients agree.
    for first, last in ((0, 0), (1, 2), (4093, 70_001), (shard.size - 3, shard.size - 1)):
        response = client.get(f"/d/{alice_token}/{SHARD}", HTTP_RANGE=f"bytes={first}-{last}")
        assert response.status_code == 206
        assert b"".join(response.streaming_content) == alice_bytes[first : last + 1]

    # The copy loads, and differs from the original by at most one unit in the last place.
    original = torch.load(io.BytesIO(Path(DEMO / SHARD).read_bytes()), weights_only=True)
    mine = torch.load(io.BytesIO(alice_bytes), weights_only=True)
    assert mine.keys() == original.keys()
    changed = 0
    for name, tensor in original.items():
        apart = one_ulp_apart(tensor, mine[name])
        assert int(apart.max()) <= 1, name
        changed += int(apart.sum())
        if tensor.ndim == 1:
            assert torch.equal(tensor, mine[name]), name  # norms stay exact
    assert changed > 10_000

    # What the grantee's tools check is the grantee's own: manifest, checklist, HEAD.
    manifest = client.get(f"/d/{alice_token}/manifest.json").json()
    sums = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert sums[SHARD] == alice_copy.sha256
    assert sums["params.json"] == artifact(release, "params.json").sha256
    checklist = b"".join(client.get(f"/d/{alice_token}/checklist.chk").streaming_content)
    assert f"{hashlib.md5(alice_bytes).hexdigest()}  {SHARD}" in checklist.decode()  # noqa: S324
    head = client.head(f"/d/{alice_token}/{SHARD}")
    assert head["ETag"] == f'"{alice_copy.sha256}"'
    landing = client.get(f"/d/{alice_token}/").content.decode()
    assert alice_copy.sha256 in landing and 'id="fingerprinted"' in landing

    # Secrets never reach the logs: not the release key, not a grantee's code.
    grant = release.grants.get(user=alice)
    secrets = (bytes(grant.release.fingerprint_key), grant_code(grant))
    assert caplog.records  # the approval, the task and the downloads did log
    for secret in secrets:
        assert secret.hex() not in caplog.text and repr(secret) not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_until_the_copy_is_prepared_nothing_is_served_or_sent(
    client, release, alice, reviewer, make_submitted
):
    token = approve(alice, make_submitted, reviewer, release)
    grant = release.grants.get()
    RecipientCopy.objects.filter(grant=grant).delete()  # as if the task had not run yet

    response = client.get(f"/d/{token}/{SHARD}")
    assert response.status_code == 503 and response["Retry-After"] == "60"
    assert client.get(f"/d/{token}/manifest.json").json()["error"] == "preparing"
    assert client.get(f"/d/{token}/download.sh").status_code == 503
    assert 'id="preparing"' in client.get(f"/d/{token}/").content.decode()
    assert client.get(f"/d/{token}/params.json").status_code == 200  # the same for everyone
    # No link email goes out before the copy is ready, on any path to it.
    grant.download_links.update(emailed_at=None)
    assert links.link_issue_and_email(grant_id=grant.pk) is False

    from weights.tasks import issue_download_link

    sent = len(mail.outbox)
    assert issue_download_link(grant.pk) is False  # the copy first, by its own task...
    assert RecipientCopy.objects.filter(grant=grant, state="ready").count() == 3
    # ...which comes back to the link task when done (eager here): one link email.
    assert [m.to for m in mail.outbox[sent:] if "download link" in m.subject] == [[alice.email]]


@pytest.mark.django_db(transaction=True)
def test_a_release_is_marked_before_its_first_grant_only(
    release, local, releases, alice, reviewer, make_submitted, tmp_path
):
    other = releases["llama-13b"]
    publish_demo(tmp_path, "llama-13b")
    application = make_submitted(alice, slugs=("llama-13b",))
    reviews.application_approve(application=application, reviewer=reviewer, releases=[other])
    with pytest.raises(FingerprintRefused) as refused:
        release_mark_fingerprinted(release=other)
    assert str(refused.value) == ALREADY_GRANTED.format(release=other, n=1)
    other.refresh_from_db()
    assert not other.fingerprinted and other.fingerprint_key is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("tool", ["wget", "curl"])
def test_download_sh_and_the_cli_verify_the_grantees_copy(
    live_server, release, alice, reviewer, make_submitted, tmp_path, tool
):
    require_tools(tool, "sh", "md5sum", "sha256sum")
    token = approve(alice, make_submitted, reviewer, release)
    url = f"{live_server.url}/d/{token}/"
    mine = {c.artifact.path: c.sha256 for c in RecipientCopy.objects.filter(grant__user=alice)}

    with urllib.request.urlopen(url + "download.sh") as response:  # noqa: S310
        run = run_download_sh(response.read(), tmp_path / "sh", tmp_path, tool)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "downloaded and verified" in run.stdout
    for path, digest in mine.items():
        assert sha256((tmp_path / "sh" / path).read_bytes()) == digest

    cli = subprocess.run(
        [sys.executable, "-m", "weights.download", url, "--dest", str(tmp_path / "cli")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_PROXY": "127.0.0.1"},
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    for path, digest in mine.items():
        assert sha256((tmp_path / "cli" / path).read_bytes()) == digest


@pytest.fixture
def operator_client(client, password):
    from tests.factories import UserFactory
    from tests.twofactor import login_with_2fa

    operator = UserFactory(username="olga", email="olga@portal.example.org")
    operator.is_staff = operator.is_superuser = True
    operator.save()
    return login_with_2fa(client, operator, password)


def release_form(release: Release, **changes) -> dict:
    values = {
        "name": release.name,
        "slug": release.slug,
        "family": release.family,
        "parameter_count": release.parameter_count or "",
        "license": release.license_id or "",
        "description": release.description,
        "sort_order": release.sort_order,
        "artifacts-TOTAL_FORMS": "0",
        "artifacts-INITIAL_FORMS": "0",
        **changes,
    }
    return {k: v for k, v in values.items() if v is not False}


@pytest.mark.django_db(transaction=True)
def test_an_operator_marks_a_release_in_the_admin_and_the_grant_shows_it(
    operator_client, local, releases, alice, bob, reviewer, make_submitted, tmp_path
):
    release = publish_demo(tmp_path)
    url = f"/admin/weights/release/{release.pk}/change/"
    response = operator_client.post(url, release_form(release, fingerprinted="on"))
    assert response.status_code == 302, response.content.decode()[:2000]
    release.refresh_from_db()
    assert release.fingerprinted and len(bytes(release.fingerprint_key)) == 32
    # Marked for good: the field is no longer an input; the key is nowhere on the page.
    page = operator_client.get(url).content.decode()
    assert 'name="fingerprinted"' not in page
    assert bytes(release.fingerprint_key).hex() not in page

    approve(alice, make_submitted, reviewer, release)
    grant = release.grants.get()
    page = operator_client.get(f"/admin/access/grant/{grant.pk}/change/").content.decode()
    assert "Own copy ready: 3 files differ from the published ones" in page

    # Another release with a grant already: the form says why it cannot be marked.
    other = releases["llama-13b"]
    application = make_submitted(bob, slugs=("llama-13b",))
    reviews.application_approve(application=application, reviewer=reviewer, releases=[other])
    other_url = f"/admin/weights/release/{other.pk}/change/"
    response = operator_client.post(other_url, release_form(other, fingerprinted="on"))
    assert response.status_code == 200
    assert ALREADY_GRANTED.format(release=other, n=1) in response.content.decode()
    other.refresh_from_db()
    assert not other.fingerprinted


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("door", ["review API approval", "review API direct grant"])
def test_every_granting_door_prepares_the_copy_before_the_link(
    client, release, alice, reviewer, make_submitted, door
):
    from rest_framework.test import APIClient

    from access.tokens import token_create
    from tests.twofactor import activate_totp

    activate_totp(reviewer)  # reviewer doors need a second factor, as always
    api = APIClient()
    secret = token_create(user=reviewer, name="scripts", second_factor=True).secret
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    sent = len(mail.outbox)
    if door == "review API approval":
        application = make_submitted(alice, slugs=("llama-7b",))
        url, body = (
            f"/api/review/applications/{application.pk}/approve/",
            {"releases": ["llama-7b"]},
        )
    else:
        from access.models import LicenseVersion
        from tests.factories import accept_license

        accept_license(alice, LicenseVersion.objects.get(version="1"))  # before it downloads
        url = "/api/review/grants/"
        body = {"user": alice.email, "release": "llama-7b", "reason": "Collaborator."}
    response = api.post(url, body, format="json")
    assert response.status_code in (200, 201), response.content

    [message] = [m for m in mail.outbox[sent:] if "download link" in m.subject]
    token = re.search(r"/d/([A-Za-z0-9_-]{32})/", message.body).group(1)
    own = RecipientCopy.objects.get(grant__user=alice, artifact=artifact(release, SHARD))
    assert own.state == "ready"
    response = client.get(f"/d/{token}/{SHARD}")
    assert response.status_code == 200
    served = b"".join(response.streaming_content)
    assert sha256(served) == own.sha256 != artifact(release, SHARD).sha256


@pytest.mark.django_db(transaction=True)
def test_publish_release_marks_at_publish_time_and_refuses_after_a_grant(
    local, releases, alice, reviewer, make_submitted, tmp_path
):
    from django.core.management import CommandError, call_command

    source = tmp_path / "src"
    shutil.copytree(DEMO, source)
    out = io.StringIO()
    call_command(
        "publish_release", str(source), "--slug", "llama-7b", "--no-transformers",
        "--fingerprinted", stdout=out,
    )  # fmt: skip
    assert "llama-7b is fingerprinted: each grantee gets their own copy." in out.getvalue()
    release = Release.objects.get(slug="llama-7b")
    assert release.fingerprinted and len(bytes(release.fingerprint_key)) == 32

    # Marking the other catalogue release once it has a grant: refused, and why.
    other = releases["llama-13b"]
    application = make_submitted(alice, slugs=("llama-13b",))
    reviews.application_approve(application=application, reviewer=reviewer, releases=[other])
    with pytest.raises(CommandError) as refused:
        call_command(
            "publish_release", str(source), "--slug", "llama-13b", "--no-transformers",
            "--fingerprinted", stdout=io.StringIO(),
        )  # fmt: skip
    assert str(refused.value) == ALREADY_GRANTED.format(release=other, n=1)
    other.refresh_from_db()
    assert not other.fingerprinted

    # Weights that cannot carry a mark (float32) are refused at marking time, precisely.
    f32 = tmp_path / "f32"
    shutil.copytree(DEMO, f32)
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        state = torch.load(f32 / name, weights_only=True)
        torch.save({k: v.float() for k, v in state.items()}, f32 / name)
    (f32 / "checklist.chk").unlink()
    with pytest.raises(CommandError, match="float32"):
        call_command(
            "publish_release", str(f32), "--slug", "llama-33b", "--no-transformers",
            "--fingerprinted", stdout=io.StringIO(),
        )  # fmt: skip
    assert not Release.objects.get(slug="llama-33b").fingerprinted
