"""download.sh run for real: hostile release names and file paths stay inert, and a re-run
of a finished download succeeds without a single request, with wget or curl.

Each test publishes a release, fetches its script from a live portal and runs it under
`sh` with a PATH that holds one downloader only.
"""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import pytest

from access.services import reviews
from tests.conftest import require_tools
from tests.weights.clients import eventually, run_download_sh
from weights.management.commands.generate_sample_release import MIB, write_sample_release
from weights.models import Artifact, DownloadEvent, LinkUsage, Release
from weights.paths import artifact_path_ok
from weights.services import links
from weights.services.publishing import list_release_files, release_publish
from weights.storage import reset_storage

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.parametrize("tool", ["wget", "curl"]),
]

MARKER = "PWNED"
INJECT = f"$(touch {MARKER})"
TICKS = f"`touch {MARKER}`"
# Everything a release can hold: publishing takes any name but hidden ones and `.part`
# leftovers, and the file endpoint refuses backslashes and control characters.
HOSTILE_FILES = [
    "-",
    "-leading-dash.bin",
    "--help",
    "-n",
    " leading space.bin",
    "trailing space.bin ",
    "two  spaces.bin",
    f"{INJECT}.bin",
    f"{TICKS}.bin",
    f"${{IFS}}{MARKER};touch {MARKER}|touch {MARKER}&.bin",
    "quote'single.bin",
    'quote"double.bin',
    "glob*?[ab]{c,d}~#%41!<>().bin",
    "END_OF_SUMS",
    "EOF",
    "unicodé ✓.bin",
    f"-dir {INJECT}/-n",
    f"-dir {INJECT}/data 'x'.bin",
    f"-dir {INJECT}/checklist.chk",
    "sub dir/ spaced name ",
]
HOSTILE_NAME = (
    f'Evil {INJECT} {TICKS} "; touch {MARKER}; echo "\ntouch {MARKER}\r\n# \' \\c \\n %s %d'
)


def _write_hostile_release(directory: Path) -> None:
    for i, path in enumerate(HOSTILE_FILES):
        if path.endswith("checklist.chk"):
            continue
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(f"file {i}: {path}\n".encode())
    checklist = directory / next(p for p in HOSTILE_FILES if p.endswith("/checklist.chk"))
    lines = [
        f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}\n"  # noqa: S324
        for p in sorted(checklist.parent.iterdir())
    ]
    checklist.write_text("".join(lines))


def _grant_token(make_submitted, alice, reviewer, releases) -> str:
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = reviews.application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    return links.link_issue(grant=grant, budget_copies=2).token


@pytest.fixture
def local(settings, tmp_path):
    settings.WEIGHTS_STORAGE = "local"
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "store"
    reset_storage()
    yield
    reset_storage()


def test_a_hostile_release_name_runs_nothing(
    live_server, local, tmp_path, alice, reviewer, make_submitted, releases, tool
):
    require_tools(tool, "sh", "md5sum", "sha256sum")
    source = tmp_path / "src"
    write_sample_release(source, size_label="7B", shards=1, shard_bytes=1024, seed=1)
    release_publish(directory=source, slug="llama-7b")
    token = _grant_token(make_submitted, alice, reviewer, releases)
    Release.objects.filter(slug="llama-7b").update(name=HOSTILE_NAME)
    with urllib.request.urlopen(f"{live_server.url}/d/{token}/download.sh") as response:  # noqa: S310
        script = response.read()
    cwd = tmp_path / "run"
    cwd.mkdir()

    run = run_download_sh(script, cwd / "out", cwd, tool)

    assert not list(tmp_path.rglob(MARKER))
    assert run.returncode == 0, run.stdout + run.stderr
    title = " ".join(HOSTILE_NAME.split())
    assert run.stdout.rstrip("\n").endswith(f"All files of {title} downloaded and verified.")


def test_hostile_names_and_paths_run_nothing_and_every_file_arrives(
    live_server, local, tmp_path, alice, reviewer, make_submitted, releases, tool
):
    require_tools(tool, "sh", "md5sum", "sha256sum")
    source = tmp_path / "src"
    _write_hostile_release(source)
    assert sorted(list_release_files(source)) == sorted(HOSTILE_FILES)  # all publishable
    assert all(artifact_path_ok(path) for path in HOSTILE_FILES)  # and all servable
    release_publish(directory=source, slug="llama-7b")
    token = _grant_token(make_submitted, alice, reviewer, releases)
    Release.objects.filter(slug="llama-7b").update(name=HOSTILE_NAME, slug="-llama-7b")
    with urllib.request.urlopen(f"{live_server.url}/d/{token}/download.sh") as response:  # noqa: S310
        script = response.read()

    cwd, dest = tmp_path / "run", tmp_path / "run" / "out"
    cwd.mkdir()
    run = run_download_sh(script, dest, cwd, tool)

    assert not [p for p in tmp_path.rglob(f"*{MARKER}*") if p.name == MARKER]
    assert not (Path.cwd() / MARKER).exists()
    assert run.returncode == 0, run.stdout + run.stderr
    for path in HOSTILE_FILES:
        assert (dest / path).read_bytes() == (source / path).read_bytes(), path
    assert (dest / "-llama-7b.sha256").is_file()
    title = " ".join(HOSTILE_NAME.split())
    assert run.stdout.rstrip("\n").endswith(f"All files of {title} downloaded and verified.")
    assert "FAILED" not in run.stdout + run.stderr
    # A stream's event is written when it closes, which may be just after wget has its last byte.
    events = eventually(DownloadEvent.objects.count, lambda n: n >= len(HOSTILE_FILES))
    assert events == len(HOSTILE_FILES)
    assert set(DownloadEvent.objects.values_list("outcome", flat=True)) == {"served"}


def test_a_rerun_of_a_finished_download_succeeds_and_fetches_nothing(
    live_server, local, tmp_path, alice, reviewer, make_submitted, releases, tool
):
    require_tools(tool, "sh", "md5sum", "sha256sum")
    source = tmp_path / "src"
    write_sample_release(source, size_label="7B", shards=2, shard_bytes=MIB, seed=1)
    release_publish(directory=source, slug="llama-7b")
    token = _grant_token(make_submitted, alice, reviewer, releases)
    with urllib.request.urlopen(f"{live_server.url}/d/{token}/download.sh") as response:  # noqa: S310
        script = response.read()
    cwd, dest = tmp_path / "run", tmp_path / "run" / "out"
    cwd.mkdir()
    first = run_download_sh(script, dest, cwd, tool)
    assert first.returncode == 0, first.stdout + first.stderr
    files = Artifact.objects.filter(release__slug="llama-7b").count()
    # Each stream settles its charge, then writes its event, when it closes: wait for the last.
    requests = eventually(DownloadEvent.objects.count, lambda n: n >= files)
    charged = sorted(LinkUsage.objects.values_list("bytes_charged", flat=True))
    assert requests == files

    again = run_download_sh(script, dest, cwd, tool)

    assert again.returncode == 0, again.stdout + again.stderr
    assert "FAILED" not in again.stdout + again.stderr
    assert DownloadEvent.objects.count() == requests  # not one request, not even a 416
    assert sorted(LinkUsage.objects.values_list("bytes_charged", flat=True)) == charged
    for path in Artifact.objects.filter(release__slug="llama-7b").values_list("path", flat=True):
        assert (dest / path).read_bytes() == (source / path).read_bytes()
        assert f"Already complete: ./{path}" in again.stdout
