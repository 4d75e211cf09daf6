"""A release may hold empty files (an empty tokenizer_checklist.chk, a placeholder): the
portal serves them, and the CLI and download.sh create them, verified, under their final name.
"""

from __future__ import annotations

import hashlib
import subprocess
import urllib.request
from pathlib import Path

import pytest
from django.core.management import call_command

from access.services.reviews import application_approve
from tests.conftest import require_tools
from tests.servers import wait_for
from tests.weights import test_download_cli
from tests.weights.clients import run_download_sh
from tests.weights.test_download_cli import FAST, assert_files, run_cli
from weights.download import Options, main
from weights.models import DownloadEvent, LinkUsage
from weights.services.links import link_issue
from weights.storage import reset_storage

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
EMPTY = "7B/placeholder.bin"

portal = test_download_cli.portal  # the fake portal, serving the `files` below


@pytest.fixture
def files() -> dict[str, bytes]:
    """Served by test_download_cli's fake `portal`: empty files among others."""
    return {"7B/params.json": b'{"dim": 64}', EMPTY: b"", "tokenizer_checklist.chk": b""}


@pytest.mark.parametrize("state", ["nothing", "empty part", "stale part", "stale final file"])
def test_the_cli_creates_empty_files_from_any_starting_state(portal, files, tmp_path, state):
    target = tmp_path / EMPTY
    target.parent.mkdir(parents=True)
    if state == "empty part":
        Path(f"{target}.part").write_bytes(b"")
    elif state == "stale part":
        Path(f"{target}.part").write_bytes(b"left over from an older release")
    elif state == "stale final file":
        target.write_bytes(b"not empty")

    assert run_cli(portal.landing, tmp_path) == 0

    assert_files(tmp_path, files)
    # Nothing to fetch for an empty file: no request, no budget.
    assert [p for p, _ in portal.file_requests()] == ["7B/params.json"]


# --- against the live portal -------------------------------------------------------------


def _publish_with_empty_files(tmp_path: Path) -> Path:
    source = tmp_path / "release"
    call_command("generate_sample_release", str(source), "--shards", "1", "--shard-mb", "1")
    (source / "tokenizer_checklist.chk").write_bytes(b"")  # a checklist listing nothing
    (source / EMPTY).write_bytes(b"")
    call_command("publish_release", str(source), "--slug", "llama-7b")
    return source


@pytest.fixture
def live_link(live_server, settings, tmp_path, alice, reviewer, make_submitted, releases):
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "storage"
    settings.WEIGHTS_STORAGE = "local"
    reset_storage()
    source = _publish_with_empty_files(tmp_path)
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    issued = link_issue(grant=grant, budget_copies=1)
    yield live_server.url + f"/d/{issued.token}/", source
    reset_storage()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "download.sh" and not p.name.endswith(".sha256")
    }


@pytest.mark.django_db(transaction=True)
def test_the_cli_downloads_a_release_with_empty_files_from_the_live_portal(live_link, tmp_path):
    url, source = live_link
    dest = tmp_path / "out"

    assert main([url, "--dest", str(dest)], opts=Options(**FAST)) == 0

    assert _tree(dest) == _tree(source)
    assert (dest / EMPTY).read_bytes() == b"" and not list(dest.rglob("*.part"))
    assert not DownloadEvent.objects.filter(artifact__size=0).exists()  # nothing to fetch
    assert main([url, "--dest", str(dest)], opts=Options(**FAST)) == 0  # all verified again


@pytest.mark.django_db(transaction=True)
def test_a_plain_get_of_an_empty_file_is_200_with_no_bytes(live_link):
    url, _ = live_link
    with urllib.request.urlopen(url + EMPTY, timeout=30) as response:  # noqa: S310
        assert (response.status, response.read()) == (200, b"")
        assert response.headers["Content-Length"] == "0"
        assert response.headers["ETag"] == f'"{EMPTY_SHA256}"'
    # The server records the event when it closes the response, just after the client reads.
    wait_for(DownloadEvent.objects.filter(artifact__path=EMPTY).exists, "the event", timeout=10)
    event = DownloadEvent.objects.get(artifact__path=EMPTY)
    assert (event.status_code, event.outcome, event.bytes) == (200, "served", 0)
    assert not LinkUsage.objects.filter(artifact__path=EMPTY).exclude(bytes_charged=0).exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("tool", ["wget", "curl"])
def test_download_sh_creates_empty_files_and_a_rerun_finds_them_complete(live_link, tmp_path, tool):
    require_tools(tool, "sh", "md5sum", "sha256sum")
    url, source = live_link
    with urllib.request.urlopen(url + "download.sh", timeout=30) as response:  # noqa: S310
        script = response.read()
    cwd, dest = tmp_path / "run", tmp_path / "run" / "out"
    cwd.mkdir()

    def run() -> subprocess.CompletedProcess:
        return run_download_sh(script, dest, cwd, tool)

    first = run()
    assert first.returncode == 0, first.stdout + first.stderr
    assert _tree(dest) == _tree(source)
    assert f"./{EMPTY}: OK" in first.stdout  # its SHA-256 was checked
    assert not DownloadEvent.objects.filter(artifact__size=0).exists()  # nothing to fetch
    again = run()
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Already complete: ./{EMPTY}" in again.stdout
    assert hashlib.sha256((dest / EMPTY).read_bytes()).hexdigest() == EMPTY_SHA256
