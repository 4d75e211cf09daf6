"""The researcher's downloader CLI (weights/download.py).

Most tests run it against a small HTTP server started here (a manifest and files with Range,
plus injected faults: a connection cut mid-file, 500s, refusals, a corrupted byte), counting
the bytes it serves. The end-to-end tests at the bottom run it against the real portal.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import namedtuple
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import require_tools
from tests.servers import free_port
from tests.weights.clients import eventually
from weights import download
from weights.download import Options, main

MIB = 1024 * 1024
TOKEN = "Tk9xQ2Lr7VbN3mWc8ZpF0aYs5HdJ6uEi"  # 32 url-safe characters, like the portal's


def _content(n: int, seed: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (n // len(block) + 1))[:n]


@dataclass
class FakePortal:
    """State of the test server: files, faults to inject, and what it served."""

    files: dict[str, bytes]
    base: str = ""
    cut_after: dict[str, int] = field(default_factory=dict)  # once: close after n body bytes
    fail_times: dict[str, int] = field(default_factory=dict)  # answer 500 this many times
    corrupt: dict[str, int] = field(default_factory=dict)  # flip the byte at this offset
    refusal: tuple[int, str, str] | None = None  # (status, detail, action_url) for files
    refuse_manifest: bool = False
    ignore_range: bool = False
    manifest_paths: list[str] | None = None  # override the paths listed (traversal tests)
    redirect: bool = False  # answer file requests with a 302 to "object storage" (another host)
    storage_refusals: int = 0  # the storage answers 403 this many times (expired signature)
    served: dict[str, int] = field(default_factory=dict)  # body bytes sent per file
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def landing(self) -> str:
        return f"{self.base}/d/{TOKEN}/"

    def manifest(self) -> dict:
        paths = self.manifest_paths or list(self.files)
        entries = []
        for listed, real in zip(paths, self.files, strict=False):
            data = self.files[real]
            entries.append(
                {
                    "path": listed,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "md5": hashlib.md5(data).hexdigest(),
                    "url": f"{self.base}/d/{TOKEN}/{real}",
                    "remaining_bytes": 5 * len(data),
                }
            )
        return {
            "release": "llama-7b",
            "name": "LLaMA 7B",
            "expires_at": "2030-01-01T00:00:00Z",
            "budget_copies": 5,
            "files": entries,
        }

    def file_requests(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] != "manifest.json" and ":" not in r[0]]

    def served_bytes(self, name: str, *, at_least: int) -> int:
        """Bytes of `name` served, once the handler has counted `at_least` (it counts after
        its write returns, which can be just after the client has the last byte)."""
        return eventually(lambda: self.served.get(name, 0), lambda n: n >= at_least)


class Handler(BaseHTTPRequestHandler):
    portal: FakePortal

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/storage/"):
            return self._storage(self.path[len("/storage/") :])
        prefix = f"/d/{TOKEN}/"
        if not self.path.startswith(prefix):
            return self._json(404, "invalid", "This download link is not valid.", "")
        path = self.path[len(prefix) :]
        portal = self.portal
        with portal.lock:
            portal.requests.append((path, self.headers.get("Range", "")))
        if path == "manifest.json":
            if portal.refuse_manifest and portal.refusal:
                return self._json(*portal.refusal[:1], "refused", *portal.refusal[1:])
            body = json.dumps(portal.manifest()).encode()
            return self._send(200, body, {"Content-Type": "application/json"})
        if path not in portal.files:
            return self._json(404, "not_found", "No such file.", "")
        if portal.refusal:
            return self._json(portal.refusal[0], "refused", *portal.refusal[1:])
        with portal.lock:
            if portal.fail_times.get(path, 0) > 0:
                portal.fail_times[path] -= 1
                return self._send(500, b"boom", {"Content-Type": "text/plain"})
        if portal.redirect:
            port = self.server.server_address[1]
            return self._send(302, b"", {"Location": f"http://localhost:{port}/storage/{path}"})
        self._serve_file(path)

    def _storage(self, path: str) -> None:
        portal = self.portal
        with portal.lock:
            portal.requests.append(("storage:" + path, self.headers.get("Range", "")))
            refuse = portal.storage_refusals > 0
            portal.storage_refusals -= int(refuse)
        if refuse:
            body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            return self._send(403, body, {"Content-Type": "application/xml"})
        self._serve_file(path)

    def _serve_file(self, path: str) -> None:
        portal = self.portal
        data = bytearray(portal.files[path])
        if path in portal.corrupt:
            data[portal.corrupt[path]] ^= 0xFF
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not portal.ignore_range:
            start, status = int(match[1]), 206
        body = bytes(data[start:])
        headers = {"ETag": f'"{hashlib.sha256(portal.files[path]).hexdigest()}"'}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        cut = portal.cut_after.pop(path, None)
        self._send(status, body, headers, cut=cut, account=path)

    def _json(self, status: int, error: str, detail: str, action_url: str) -> None:
        body = json.dumps({"error": error, "detail": detail, "action_url": action_url}).encode()
        self._send(status, body, {"Content-Type": "application/json"})

    def _send(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str],
        *,
        cut: int | None = None,
        account: str | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        sent = body if cut is None else body[:cut]
        try:
            self.wfile.write(sent)
            self.wfile.flush()
        except OSError:
            return
        finally:
            if account:
                with self.portal.lock:
                    self.portal.served[account] = self.portal.served.get(account, 0) + len(sent)
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def files() -> dict[str, bytes]:
    return {
        "7B/consolidated.00.pth": _content(3 * 1024 * 1024 + 123, 1),
        "7B/params.json": b'{"dim": 64, "n_layers": 2}',
        "7B/checklist.chk": b"0" * 32 + b"  consolidated.00.pth\n",
        "tokenizer.model": _content(50_000, 2),
    }


@pytest.fixture
def portal(files: dict[str, bytes]) -> Iterator[FakePortal]:
    state = FakePortal(files=files)
    handler = type("BoundHandler", (Handler,), {"portal": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


FAST = {"backoff": 0.01, "timeout": 10.0}


def run_cli(url: str, dest: Path, *args: str, hash_thread: bool = True) -> int:
    opts = Options(**FAST, hash_thread=hash_thread)
    return main([url, "--dest", str(dest), *args], opts=opts)


def assert_files(dest: Path, files: dict[str, bytes], expected: list[str] | None = None) -> None:
    expected = list(files) if expected is None else expected
    for path in expected:
        assert (dest / path).read_bytes() == files[path], path
    assert not list(dest.rglob("*.part"))
    written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert written == sorted(expected)


# --------------------------------------------------------------------------- happy paths


def test_full_download_verifies_and_names_every_file(portal, files, tmp_path, capsys):
    assert run_cli(portal.landing, tmp_path, "--jobs", "3") == 0

    assert_files(tmp_path, files)
    total = sum(len(d) for d in files.values())
    assert eventually(lambda: sum(portal.served.values()), lambda n: n >= total) == total
    out = capsys.readouterr()
    assert "4 downloaded and verified" in out.err
    assert TOKEN not in out.out + out.err


@pytest.mark.parametrize(
    ("url", "manifest"),
    [
        ("https://p.example/d/{t}/", "https://p.example/d/{t}/manifest.json"),
        ("https://p.example/d/{t}", "https://p.example/d/{t}/manifest.json"),
        ("https://p.example/d/{t}/manifest.json", "https://p.example/d/{t}/manifest.json"),
        ("https://p.example/d/{t}/*", "https://p.example/d/{t}/manifest.json"),
        ("https://p.example/d/{t}/download.sh", "https://p.example/d/{t}/manifest.json"),
        ("https://p.example/d/{t}/7B/params.json", "https://p.example/d/{t}/manifest.json"),
        ("http://h:8000/portal/d/{t}/?x=1#top", "http://h:8000/portal/d/{t}/manifest.json"),
    ],
)
def test_every_link_form_normalises_to_the_manifest(url, manifest):
    link = download.parse_link(url.format(t=TOKEN))
    assert link.manifest_url == manifest.format(t=TOKEN)
    assert link.token == TOKEN


@pytest.mark.parametrize("url", ["ftp://p.example/d/x/", "p.example/d/x/", "https://p.example/"])
def test_a_url_that_is_not_a_link_is_a_usage_error(url, tmp_path, capsys):
    assert main([url, "--dest", str(tmp_path)]) == download.EXIT_USAGE
    assert "error:" in capsys.readouterr().err


def test_the_classic_star_form_downloads(portal, files, tmp_path):
    assert run_cli(portal.landing + "*", tmp_path, "--quiet") == 0
    assert_files(tmp_path, files)


def test_include_selects_matching_paths_only(portal, files, tmp_path):
    code = run_cli(portal.landing, tmp_path, "--include", "7B/*.json", "--include", "tok*")

    assert code == 0
    assert_files(tmp_path, files, ["7B/params.json", "tokenizer.model"])
    assert {p for p, _ in portal.file_requests()} == {"7B/params.json", "tokenizer.model"}


def test_include_matching_nothing_is_a_usage_error(portal, tmp_path, capsys):
    assert run_cli(portal.landing, tmp_path, "--include", "65B/*") == download.EXIT_USAGE
    assert "no file in the manifest matches 65B/*" in capsys.readouterr().err


def test_progress_lines_without_a_terminal(portal, tmp_path, capsys):
    assert run_cli(portal.landing, tmp_path, "--include", "7B/params.json") == 0
    err = capsys.readouterr().err
    assert "LLaMA 7B: 1 files" in err
    assert "7B/params.json: verified" in err


# --------------------------------------------------------------------------- resume and retries

BIG = "7B/consolidated.00.pth"


@pytest.mark.parametrize("hash_thread", [True, False], ids=["hash-thread", "hash-inline"])
def test_a_cut_mid_file_resumes_without_refetching_bytes_before_the_cut(
    portal, files, tmp_path, hash_thread
):
    cut = 1_500_000
    portal.cut_after[BIG] = cut

    assert run_cli(portal.landing, tmp_path, "--include", BIG, hash_thread=hash_thread) == 0

    assert (tmp_path / BIG).read_bytes() == files[BIG]
    assert portal.file_requests() == [(BIG, ""), (BIG, f"bytes={cut}-")]
    # 0 bytes before the cut fetched twice
    assert portal.served_bytes(BIG, at_least=len(files[BIG])) == len(files[BIG])


def test_a_part_left_by_an_earlier_run_is_resumed(portal, files, tmp_path):
    cut = 2_000_000
    portal.cut_after[BIG] = cut
    assert run_cli(portal.landing, tmp_path, "--include", BIG, "--retries", "0") == 1
    assert (tmp_path / (BIG + ".part")).stat().st_size == cut
    assert not (tmp_path / BIG).exists()

    assert run_cli(portal.landing, tmp_path, "--include", BIG) == 0

    assert (tmp_path / BIG).read_bytes() == files[BIG]
    assert portal.file_requests()[-1] == (BIG, f"bytes={cut}-")
    assert portal.served_bytes(BIG, at_least=len(files[BIG])) == len(files[BIG])


def test_a_server_that_ignores_range_restarts_from_zero(portal, files, tmp_path):
    part = tmp_path / (BIG + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(files[BIG][:1000])
    portal.ignore_range = True

    assert run_cli(portal.landing, tmp_path, "--include", BIG) == 0
    assert (tmp_path / BIG).read_bytes() == files[BIG]


def test_a_part_longer_than_the_file_is_discarded(portal, files, tmp_path):
    part = tmp_path / "tokenizer.model.part"
    part.write_bytes(b"x" * (len(files["tokenizer.model"]) + 10))

    assert run_cli(portal.landing, tmp_path, "--include", "tokenizer.model") == 0
    assert portal.file_requests() == [("tokenizer.model", "")]


def test_server_errors_are_retried(portal, files, tmp_path, capsys):
    portal.fail_times["tokenizer.model"] = 2

    assert run_cli(portal.landing, tmp_path, "--include", "tokenizer.model") == 0

    assert (tmp_path / "tokenizer.model").read_bytes() == files["tokenizer.model"]
    assert len(portal.file_requests()) == 3
    assert "server error HTTP 500; retrying" in capsys.readouterr().err


def test_retries_run_out(portal, tmp_path, capsys):
    portal.fail_times["tokenizer.model"] = 10

    code = run_cli(portal.landing, tmp_path, "--include", "tokenizer.model", "--retries", "2")

    assert code == download.EXIT_FAILED
    assert len(portal.file_requests()) == 3
    assert not (tmp_path / "tokenizer.model").exists()
    assert "FAILED tokenizer.model: giving up after 2 retries" in capsys.readouterr().err


def test_an_unreachable_portal(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/d/{TOKEN}/"  # a port nobody listens on

    assert run_cli(url, tmp_path, "--retries", "1") == download.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "could not fetch the manifest" in err
    assert TOKEN not in err


def test_a_storage_refusal_behind_a_redirect_is_retried_through_the_portal(portal, files, tmp_path):
    portal.redirect = True
    portal.storage_refusals = 1

    assert run_cli(portal.landing, tmp_path, "--include", "tokenizer.model") == 0

    assert (tmp_path / "tokenizer.model").read_bytes() == files["tokenizer.model"]
    assert len(portal.file_requests()) == 2  # a fresh redirect minted for the retry


def test_a_cut_behind_a_redirect_resumes_with_range_at_the_storage(portal, files, tmp_path):
    portal.redirect = True
    portal.cut_after[BIG] = 1_234_567

    assert run_cli(portal.landing, tmp_path, "--include", BIG) == 0

    assert (tmp_path / BIG).read_bytes() == files[BIG]
    storage = [r for r in portal.requests if r[0].startswith("storage:")]
    assert storage == [("storage:" + BIG, ""), ("storage:" + BIG, "bytes=1234567-")]
    assert portal.served_bytes(BIG, at_least=len(files[BIG])) == len(files[BIG])


# --------------------------------------------------------------------------- rate limit


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        ("65536", 65536),
        ("500k", 512_000),
        ("16M", 16 * MIB),
        ("1.5m", 1_572_864),
        ("2G", 2048 * MIB),
    ],
)
def test_limit_rate_reads_wgets_suffixes(value, rate):
    args = download.build_parser().parse_args(
        [f"https://p.example/d/{TOKEN}/", "--limit-rate", value]
    )
    assert args.limit_rate == rate


@pytest.mark.parametrize("value", ["fast", "16MB", "-5k", "0", ""])
def test_a_bad_limit_rate_is_a_usage_error(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([f"https://p.example/d/{TOKEN}/", "--dest", str(tmp_path), "--limit-rate", value])
    assert exited.value.code == download.EXIT_USAGE
    assert "--limit-rate" in capsys.readouterr().err


def test_the_limit_holds_for_the_whole_run_across_parallel_files(portal, files, tmp_path):
    small = ["7B/params.json", "7B/checklist.chk", "tokenizer.model"]
    nbytes = sum(len(files[path]) for path in small)
    rate = 25_600  # about 2 s for the ~50 kB: a limit per file would take a third of that
    includes = [arg for path in small for arg in ("--include", path)]

    started = time.monotonic()
    code = run_cli(portal.landing, tmp_path, *includes, "--jobs", "3", "--limit-rate", str(rate))
    elapsed = time.monotonic() - started

    assert code == 0
    assert_files(tmp_path, files, small)
    assert elapsed >= nbytes / rate - 0.1, elapsed


# --------------------------------------------------------------------------- refusals

REFUSALS = [
    (410, "This download link expired on 01 Jan 2030.", download.EXIT_EXPIRED),
    (403, "This download link was revoked.", download.EXIT_FORBIDDEN),
    (429, "This link has used its download budget.", download.EXIT_BUDGET),
    (404, "This download link is not valid.", download.EXIT_NOT_FOUND),
]


@pytest.mark.parametrize(("status", "detail", "exit_code"), REFUSALS)
def test_a_refused_file_stops_at_once_with_the_servers_message(
    portal, tmp_path, capsys, status, detail, exit_code
):
    portal.refusal = (status, detail, "/downloads/")

    code = run_cli(portal.landing, tmp_path, "--jobs", "1")

    assert code == exit_code
    assert len(portal.file_requests()) == 1  # no retry, and the other files are not tried
    err = capsys.readouterr().err
    assert f"HTTP {status}" in err
    assert detail in err
    assert f"What to do: {portal.base}/downloads/" in err
    assert TOKEN not in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".part")]


@pytest.mark.parametrize(("status", "detail", "exit_code"), REFUSALS[:3])
def test_a_refused_manifest_stops_with_the_servers_message(
    portal, tmp_path, capsys, status, detail, exit_code
):
    portal.refusal = (status, detail, "/downloads/")
    portal.refuse_manifest = True

    assert run_cli(portal.landing, tmp_path) == exit_code
    assert portal.requests == [("manifest.json", "")]
    assert detail in capsys.readouterr().err


def test_a_refusal_mid_run_keeps_partial_files_for_later(portal, files, tmp_path):
    portal.cut_after[BIG] = 1_000_000
    assert run_cli(portal.landing, tmp_path, "--include", BIG, "--retries", "0") == 1
    portal.refusal = (410, "expired", "/downloads/")

    assert run_cli(portal.landing, tmp_path, "--include", BIG) == download.EXIT_EXPIRED
    assert (tmp_path / (BIG + ".part")).stat().st_size == 1_000_000


# --------------------------------------------------------------------------- integrity and safety


@pytest.mark.parametrize("hash_thread", [True, False], ids=["hash-thread", "hash-inline"])
def test_a_sha256_mismatch_leaves_no_final_file(portal, tmp_path, capsys, hash_thread):
    portal.corrupt[BIG] = 2_000_000

    code = run_cli(
        portal.landing,
        tmp_path,
        "--include",
        BIG,
        "--include",
        "tokenizer.model",
        hash_thread=hash_thread,
    )

    assert code == download.EXIT_FAILED
    assert not (tmp_path / BIG).exists()
    assert not (tmp_path / (BIG + ".part")).exists()
    assert (tmp_path / "tokenizer.model").exists()  # the other file still completes
    err = capsys.readouterr().err
    assert f"FAILED {BIG}: SHA-256 mismatch" in err
    assert "1 downloaded and verified, 0 already complete, 1 failed" in err


@pytest.mark.parametrize(
    "bad",
    [
        "../escape.bin",
        "7B/../../escape.bin",
        "/tmp/escape.bin",
        "7B/..",
        "..\\escape.bin",
        "C:/escape.bin",
        "7B//x",
        "./x",
        "bell\x07.bin",
    ],
)
def test_unsafe_manifest_paths_are_refused_before_anything_is_written(
    portal, tmp_path, capsys, bad
):
    dest = tmp_path / "dest"
    portal.manifest_paths = ["7B/params.json", bad, "tokenizer.model", "7B/checklist.chk"]

    assert run_cli(portal.landing, dest) == download.EXIT_MANIFEST

    assert "unsafe path in manifest" in capsys.readouterr().err
    assert portal.file_requests() == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_target_path_stays_inside_dest(tmp_path):
    assert download.target_path(tmp_path, "7B/x.pth") == tmp_path / "7B" / "x.pth"
    with pytest.raises(download.ManifestError):
        download.target_path(tmp_path, "7B/../../x")


def test_complete_files_are_skipped_without_a_request(portal, files, tmp_path, capsys):
    for path in ("7B/consolidated.00.pth", "tokenizer.model"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(files[path])

    assert run_cli(portal.landing, tmp_path) == 0

    assert {p for p, _ in portal.file_requests()} == {"7B/params.json", "7B/checklist.chk"}
    assert "2 downloaded and verified, 2 already complete, 0 failed" in capsys.readouterr().err
    assert_files(tmp_path, files)


def test_a_stale_final_file_is_replaced(portal, files, tmp_path):
    stale = tmp_path / "tokenizer.model"
    stale.write_bytes(b"y" * len(files["tokenizer.model"]))

    assert run_cli(portal.landing, tmp_path, "--include", "tokenizer.model") == 0
    assert stale.read_bytes() == files["tokenizer.model"]


Usage = namedtuple("Usage", "total used free")


def test_not_enough_disk_space_stops_before_downloading(
    portal, files, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1000, 1000))

    assert run_cli(portal.landing, tmp_path / "new" / "dir") == download.EXIT_DISK

    err = capsys.readouterr().err
    assert "not enough disk space" in err
    assert "choose --dest elsewhere" in err
    assert portal.file_requests() == []


def test_disk_space_counts_only_the_bytes_still_to_fetch(portal, files, tmp_path, monkeypatch):
    part = tmp_path / (BIG + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(files[BIG][:3_000_000])
    still = len(files[BIG]) - 3_000_000
    seen: list[str] = []

    def usage(path):
        seen.append(str(path))
        return Usage(10**12, 0, still)

    monkeypatch.setattr(shutil, "disk_usage", usage)

    assert run_cli(portal.landing, tmp_path, "--include", BIG) == 0
    assert seen == [str(tmp_path)]
    assert portal.served_bytes(BIG, at_least=still) == still


# --------------------------------------------------------------------------- the real portal


@dataclass
class Granted:
    url: str
    source: Path
    link: object


@pytest.fixture
def granted_link(live_server, settings, tmp_path, alice, reviewer, make_submitted, releases):
    """Publish a generated two-shard release, approve alice for it, issue her a link."""
    from django.core.management import call_command

    from access.services.reviews import application_approve
    from weights.services.links import link_issue
    from weights.storage import reset_storage

    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "storage"
    settings.WEIGHTS_STORAGE = "local"
    reset_storage()
    source = tmp_path / "release"
    call_command("generate_sample_release", str(source), "--shards", "2", "--shard-mb", "1")
    call_command("publish_release", str(source), "--slug", "llama-7b")
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    issued = link_issue(grant=grant)
    yield Granted(url=live_server.url + f"/d/{issued.token}/", source=source, link=issued.link)
    reset_storage()


def _release_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.django_db(transaction=True)
def test_end_to_end_against_the_live_portal(granted_link, tmp_path, capsys):
    dest = tmp_path / "out"
    token = granted_link.url.split("/d/")[1].strip("/")

    assert main([granted_link.url, "--dest", str(dest), "--jobs", "2"], opts=Options(**FAST)) == 0

    assert _release_files(dest) == _release_files(granted_link.source)
    assert token not in capsys.readouterr().err
    # A second run, through the classic `*` form, finds everything verified.
    assert main([granted_link.url + "*", "--dest", str(dest)], opts=Options(**FAST)) == 0
    assert "0 downloaded and verified, " in capsys.readouterr().err


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("change", "exit_code", "message"),
    [
        ("revoke", download.EXIT_FORBIDDEN, "This download link was revoked."),
        ("expire", download.EXIT_EXPIRED, "This download link expired on"),
    ],
)
def test_the_live_portal_refusals_stop_the_cli(
    granted_link, tmp_path, capsys, reviewer, change, exit_code, message
):
    from datetime import timedelta

    from django.utils import timezone

    from weights.models import DownloadLink
    from weights.services.links import link_revoke

    if change == "revoke":
        link_revoke(link=granted_link.link, actor=reviewer, reason="test")
    else:
        DownloadLink.objects.filter(pk=granted_link.link.pk).update(
            expires_at=timezone.now() - timedelta(minutes=1)
        )

    code = main([granted_link.url, "--dest", str(tmp_path / "out")], opts=Options(**FAST))

    assert code == exit_code
    err = capsys.readouterr().err
    assert message in err
    assert "What to do: http://" in err and "/downloads/" in err


@pytest.mark.django_db(transaction=True)
def test_shipped_download_sh_works_against_the_live_portal(granted_link, tmp_path):
    if not shutil.which("wget"):
        require_tools("curl")  # the script falls back to curl
    import urllib.request

    script = urllib.request.urlopen(granted_link.url + "download.sh", timeout=30).read()
    dest = tmp_path / "sh"
    dest.mkdir()
    (dest / "download.sh").write_bytes(script)
    result = subprocess.run(
        ["sh", "download.sh", str(dest)],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expected = _release_files(granted_link.source)
    got = _release_files(dest)
    assert {k: v for k, v in got.items() if k in expected} == expected
    if shutil.which("md5sum"):
        assert "consolidated.00.pth: OK" in result.stdout


@pytest.fixture
def granted_s3_link(live_server, s3_storage, tmp_path, alice, reviewer, make_submitted, releases):
    """The same journey with the weights in S3-compatible storage (moto's server on loopback)."""
    from django.core.management import call_command

    from access.services.reviews import application_approve
    from weights.services.links import link_issue

    source = tmp_path / "release"
    call_command("generate_sample_release", str(source), "--shards", "2", "--shard-mb", "1")
    call_command("publish_release", str(source), "--slug", "llama-7b")
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    issued = link_issue(grant=grant)
    return Granted(url=live_server.url + f"/d/{issued.token}/", source=source, link=issued.link)


@pytest.mark.django_db(transaction=True)
def test_end_to_end_with_s3_storage_resumes_through_presigned_redirects(granted_s3_link, tmp_path):
    from weights.models import DownloadEvent, LinkUsage

    dest = tmp_path / "out"
    shard = "7B/consolidated.00.pth"
    data = (granted_s3_link.source / shard).read_bytes()
    half = len(data) // 2
    # A download cut halfway: the .part holds the first half.
    (dest / "7B").mkdir(parents=True)
    (dest / f"{shard}.part").write_bytes(data[:half])

    assert (
        main([granted_s3_link.url, "--dest", str(dest), "--jobs", "2"], opts=Options(**FAST)) == 0
    )

    assert _release_files(dest) == _release_files(granted_s3_link.source)
    events = DownloadEvent.objects.filter(artifact__path=shard)
    assert [(e.status_code, e.outcome, e.range_header) for e in events] == [
        (302, "redirected", f"bytes={half}-")
    ]
    # Only the authorised second half was charged for the resumed shard.
    usage = LinkUsage.objects.get(link=granted_s3_link.link, artifact__path=shard)
    assert usage.bytes_charged == len(data) - half
