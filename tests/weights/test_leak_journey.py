"""Issue 14's scenario, end to end: `make run`'s portal (bootstrap_demo), the operator marks
`llama-demo` fingerprinted in the admin, a reviewer approves two researchers in the admin,
one downloads with download.sh (wget, `md5sum -c`), the other with the project's CLI
(SHA-256), both over HTTP from a real server; `manage.py trace_leak` then names each from
their files, and both from the average of their files."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from django.conf import settings
from django.core import mail
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from huggingface_hub import hf_hub_download

from access.models import Application, Grant
from access.services.applications import application_save_draft, application_submit
from access.tokens import token_create
from tests.conftest import FIELDS, require_tools
from tests.factories import UserFactory, accept_license
from tests.servers import ROOT
from tests.twofactor import login_with_2fa
from tests.weights.clients import run_download_sh
from weights.models import Release
from weights.storage import reset_storage

SLUG = "llama-demo"
SHARD = re.compile(r"consolidated\.\d+\.pth")
LINK = re.compile(r"/d/([A-Za-z0-9_-]{32})/")


@pytest.fixture
def made_run(settings, tmp_path):
    """What `make run` sets up (bootstrap_demo), on this test's database and disk."""
    settings.WEIGHTS_STORAGE = "local"
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "store"
    settings.VAR_DIR = tmp_path / "var"
    reset_storage()
    call_command("bootstrap_demo", stdout=io.StringIO())
    yield json.loads((settings.VAR_DIR / "demo-credentials.json").read_text())
    reset_storage()


def signed_in(username: str, password: str) -> Client:
    from django.contrib.auth import get_user_model

    return login_with_2fa(Client(), get_user_model().objects.get(username=username), password)


def apply(user, release: Release) -> Application:
    fields = {**FIELDS, "full_name": f"{user.username.title()} Researcher"}
    draft = application_save_draft(
        applicant=user, fields={**fields, "institutional_email": user.email}, releases=[release]
    )
    acceptance = accept_license(user, release.license)
    return application_submit(application=draft, applicant=user, license_acceptance=acceptance)


def release_change_form(admin: Client, release: Release) -> dict:
    """The release's admin form as the page renders it, with `fingerprinted` ticked."""
    page = admin.get(reverse("admin:weights_release_change", args=[release.pk])).content.decode()
    assert 'name="fingerprinted"' in page
    values = {
        "name": release.name,
        "slug": release.slug,
        "family": release.family,
        "parameter_count": release.parameter_count or "",
        "license": release.license_id,
        "description": release.description,
        "sort_order": release.sort_order,
        "fingerprinted": "on",
    }
    for prefix in set(re.findall(r'name="([\w-]+)-TOTAL_FORMS"', page)):
        values |= {f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0"}
    return values


def average_shards(folders: list[Path], out: Path) -> Path:
    """What two colluders would publish: the mean of their copies, saved in float32."""
    out.mkdir()
    names = sorted(p.name for p in folders[0].rglob("*.pth") if SHARD.fullmatch(p.name))
    assert len(names) == 2
    for name in names:
        states = [torch.load(next(f.rglob(name)), weights_only=True) for f in folders]
        torch.save(
            {k: (states[0][k].float() + states[1][k].float()) / 2 for k in states[0]}, out / name
        )
    return out


def trace(path: Path) -> str:
    out = io.StringIO()
    call_command("trace_leak", str(path), stdout=out)
    return re.search(r"^Verdict: (.*)$", out.getvalue(), re.M).group(1)


@pytest.mark.django_db(transaction=True)
def test_two_researchers_download_and_each_is_named_from_their_files(
    live_server, made_run, tmp_path
):
    require_tools("wget", "sh", "md5sum", "sha256sum")
    settings.SITE_URL = live_server.url  # the emailed links point at this server
    release = Release.objects.get(slug=SLUG)

    # The operator (make run's admin account) marks the release in the admin.
    operator = signed_in("admin", made_run["admin"])
    url = reverse("admin:weights_release_change", args=[release.pk])
    response = operator.post(url, release_change_form(operator, release))
    assert response.status_code == 302, response.content.decode()[:3000]
    release.refresh_from_db()
    assert release.fingerprinted

    # Two researchers apply; the reviewer approves each in the admin.
    reviewer = signed_in("reviewer", made_run["reviewer"])
    ada = UserFactory(username="ada", email="ada@uni.example.edu")
    ben = UserFactory(username="ben", email="ben@lab.example.org")
    tokens = {}
    for user in (ada, ben):
        application = apply(user, release)
        approve = reverse("admin:access_application_approve", args=[application.pk])
        sent = len(mail.outbox)
        assert reviewer.post(approve, {"releases": [release.pk]}).status_code == 302
        [message] = [m for m in mail.outbox[sent:] if m.to == [user.email] and LINK.search(m.body)]
        tokens[user.username] = LINK.search(message.body).group(1)
    grants = {g.user.username: g for g in Grant.objects.filter(release=release)}
    assert set(grants) == {"ada", "ben"}

    # ada: download.sh with wget, checked by md5sum -c against her own checklist.
    base = f"{live_server.url}/d/"
    with urllib.request.urlopen(f"{base}{tokens['ada']}/download.sh") as response:  # noqa: S310
        run = run_download_sh(response.read(), tmp_path / "ada", tmp_path, "wget")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "downloaded and verified" in run.stdout
    # ben: the project's CLI, checking each file's SHA-256.
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "weights.download",
            f"{base}{tokens['ben']}/",
            "--dest",
            str(tmp_path / "ben"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_PROXY": "127.0.0.1"},
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    ada_files, ben_files = tmp_path / "ada", tmp_path / "ben"
    assert {p.name for p in ada_files.rglob("*.pth")} == {p.name for p in ben_files.rglob("*.pth")}
    # ada also takes the transformers layout with the Hugging Face client (Hub door).
    hub_token = token_create(user=ada, name="hf", second_factor=False).secret
    hf = Path(
        hf_hub_download(
            f"{settings.WEIGHTS_HUB_NAMESPACE}/{SLUG}",
            "model.safetensors",
            endpoint=live_server.url,
            token=hub_token,
            cache_dir=tmp_path / "hf-cache",
        )
    )

    # Each is named from their own files, and nobody else.
    assert trace(ada_files) == f"RECIPIENT: ada <ada@uni.example.edu> (grant {grants['ada'].pk})"
    assert trace(ben_files) == f"RECIPIENT: ben <ben@lab.example.org> (grant {grants['ben'].pk})"
    # Each layout on its own names its recipient too.
    assert trace(hf) == f"RECIPIENT: ada <ada@uni.example.edu> (grant {grants['ada'].pk})"
    # The average of their Meta shards names both.
    both = trace(average_shards([ada_files, ben_files], tmp_path / "average"))
    assert both.startswith("RECIPIENT: ")
    assert f"ada <ada@uni.example.edu> (grant {grants['ada'].pk})" in both
    assert f"ben <ben@lab.example.org> (grant {grants['ben'].pk})" in both
