"""Download benchmark: `python -m weights.bench [--size-mb 1024] [--runs 3] [--only M,M] [--record FILE]`.

Builds a throw-away portal under a temporary directory (SQLite, local storage), publishes a
generated single-shard release of --size-mb MiB, approves a researcher and issues a link through
the services, starts the production server (gunicorn, the docker-compose command line) on
loopback, and measures:

1. throughput: the file read straight from disk in 1 MiB chunks (page cache warm, nothing
   dropped) next to the same file fetched through the portal over HTTP (client discards the
   bytes), and next to the downloader CLI (writes `.part`, hashes, renames);
2. resume: the CLI is killed at about half the file, then run again; the portal's own
   DownloadEvents say which range the resume asked for and how many bytes each request sent;
3. verification cost: CLI time with SHA-256 verification next to the same CLI with it off;
4. cuts: on a fresh one-copy link, each rate-limited resuming client (curl, wget, the CLI) is
   SIGKILLed at 1/4, 2/4 and 3/4 of the file and run again; LinkUsage says what was charged
   against what the client had on disk (the bytes kernel buffers swallowed at each cut);
5. aria2c: `aria2c -x16` on fresh one-copy and five-copy links, whose rates should match;
6. fingerprinted: a generated bf16 LLaMA-shaped checkpoint (params.json, consolidated.00.pth;
   --size-mb, default 384 MiB) published twice, plain and fingerprinted, one researcher
   approved for both (the approval prepares their copy's checksums); both files fetched over
   HTTP, alternating which goes first; the rate of the fingerprinted one over the plain one
   (the issue's target: >= 50 %), and the fingerprinted bytes' SHA-256 checked against the
   grantee's RecipientCopy. With --materialise the portal writes each grantee's copy into
   storage once (WEIGHTS_FINGERPRINT_MATERIALISE) and serves it as a stored file.

`--only cuts,aria2c` runs only those (names: throughput, verification, resume, cuts, aria2c,
fingerprinted).
Medians of --runs runs. Prints the figures; the last line is a JSON object. This is a
benchmark, not a test: it takes about a minute and needs ~4x --size-mb of free disk.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import math
import mmap
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from weights import download

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
SLUG = "llama-bench"
SHARD = "7B/consolidated.00.pth"
BUDGET_USER = "bench-budget"  # the researcher whose fresh links the budget measures use
SLACK = 16 * MIB  # WEIGHTS_BUDGET_SLACK_BYTES as the bench's portal runs (the default)
# The fingerprinted measure: one checkpoint published plain and fingerprinted.
FP_SLUG, PLAIN_SLUG = "llama-bench-fp", "llama-bench-plain"
FP_USER = "bench-fp"
FINGERPRINTED_MB = 384  # the checkpoint's size unless --size-mb is given
FP_TARGET = 0.5  # the issue's: fingerprinted streaming at >= 50 % of the plain rate
WORKERS = 3
GUNICORN_ARGS = ["--workers", str(WORKERS), "--timeout", "60"]  # as docker-compose.yml runs it


# --------------------------------------------------------------------------- the portal


@dataclass
class Portal:
    root: Path
    env: dict[str, str]
    base_url: str = ""
    token: str = ""
    stored_file: Path | None = None
    server: subprocess.Popen[bytes] | None = None

    @property
    def link(self) -> str:
        return f"{self.base_url}/d/{self.token}/"

    def file_url(self, path: str = SHARD) -> str:
        return self.link + urllib.parse.quote(path)


def portal_env(root: Path, materialise: bool = False) -> dict[str, str]:
    """Production settings (DEBUG off) on loopback, everything under root; with
    ``materialise``, fingerprinted copies are written out and served as stored files."""
    prefixes = ("DJANGO_", "PORTAL_", "WEIGHTS_", "DATABASE_", "REDIS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(48),
        SECURE_SSL_REDIRECT="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        PORTAL_VAR_DIR=str(root / "var"),
        DATABASE_URL=f"sqlite:///{root / 'db.sqlite3'}",
        WEIGHTS_STORAGE="local",
        WEIGHTS_LOCAL_ROOT=str(root / "storage"),
        WEIGHTS_X_ACCEL_PREFIX="",
        # Each download's event is in the database when its response ends (the resume
        # measure reads them at once); a few events per run make batching irrelevant here.
        WEIGHTS_EVENT_BATCH="1",
        WEIGHTS_FINGERPRINT_MATERIALISE="1" if materialise else "0",
        LOG_LEVEL="WARNING",
    )
    return env


def manage(portal: Portal, *args: str) -> str:
    result = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, str(REPO / "manage.py"), *args],
        cwd=REPO,
        env=portal.env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(f"manage.py {args[0]} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def internal(portal: Portal, command: str) -> dict:
    """Run a helper of this module inside Django with the portal's settings."""
    result = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "weights.bench", "--internal", command],
        cwd=REPO,
        env=portal.env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(f"--internal {command} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_portal(root: Path, size_mb: int, materialise: bool = False) -> Portal:
    portal = Portal(root=root, env=portal_env(root, materialise))
    (root / "var").mkdir(parents=True)
    manage(portal, "migrate", "--noinput", "-v", "0")
    source = root / "release"
    manage(
        portal, "generate_sample_release", str(source), "--shards", "1", "--shard-mb", str(size_mb)
    )
    manage(
        portal, "publish_release", str(source), "--slug", SLUG, "--name", "LLaMA bench", "-v", "0"
    )
    shutil.rmtree(source)  # only the stored copy is needed from here on
    issued = internal(portal, "issue-link")
    portal.token = issued["token"]
    portal.stored_file = Path(issued["stored_file"])
    return portal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(portal: Portal) -> None:
    port = free_port()
    gunicorn = Path(sys.executable).with_name("gunicorn")
    command = [str(gunicorn), "portal.wsgi:application", "--bind", f"127.0.0.1:{port}"]
    portal.server = subprocess.Popen(  # noqa: S603
        [*command, *GUNICORN_ARGS],
        cwd=REPO,
        env=portal.env,
        stdout=subprocess.DEVNULL,
        stderr=open(portal.root / "gunicorn.log", "wb"),  # noqa: SIM115 - lives with the server
    )
    portal.base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", f"/d/{portal.token}/manifest.json")
            if conn.getresponse().status == 200:
                return
        if portal.server.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not start; see {portal.root / 'gunicorn.log'}")


def stop_server(portal: Portal) -> None:
    if portal.server is not None and portal.server.poll() is None:
        portal.server.send_signal(signal.SIGTERM)
        try:
            portal.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            portal.server.kill()


# --------------------------------------------------------------------------- measurements


def timed(fn: Callable[[], object]) -> float:
    """Seconds fn takes, starting with no dirty pages, so one run's writeback never lands on
    the next one's clock."""
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_from_disk(path: Path) -> int:
    buffer = bytearray(MIB)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def warm_up_workers(portal: Portal, requests: int = 12) -> None:
    """Send each gunicorn worker a few 1-byte range requests first: a worker's first request
    pays for lazy set-up (URL resolver, database connection) that a download should not."""
    parts = urllib.parse.urlsplit(portal.file_url())
    for _ in range(requests):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("GET", parts.path, headers={"Range": "bytes=0-0"})
        conn.getresponse().read()
        conn.close()


def fetch_over_http(url: str, sink: Callable[[memoryview], object] | None = None) -> int:
    """GET the whole file and discard it (1 MiB reads), as the portal's raw throughput;
    `sink` sees each block read (to hash it)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", parts.path, headers={"User-Agent": "weights.bench"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"portal answered HTTP {response.status}")
    buffer = memoryview(bytearray(MIB))
    total = 0
    while n := response.readinto(buffer):
        total += n
        if sink is not None:
            sink(buffer[:n])
    conn.close()
    return total


def read_direct(path: Path) -> int:
    """Read the file from the device itself, bypassing the page cache (O_DIRECT, 1 MiB
    aligned reads): nothing is dropped from the cache, the reads just do not use it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    buffer = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT requires
    total = 0
    try:
        while n := os.preadv(fd, [buffer], total):
            total += n
    finally:
        os.close(fd)
        buffer.close()
    return total


def cli_download(link: str, dest: Path, opts: download.Options) -> None:
    code, outcome = download.download(link, dest=dest, jobs=1, opts=opts, quiet=True)
    if code != 0:
        raise RuntimeError(f"CLI download failed with exit code {code}: {outcome.failed}")


def verify_afterwards(path: Path) -> None:
    download.sha256_file(path)


def local_copy(src: Path, dst: Path, hashing: str) -> None:
    """The CLI's write-and-hash loop with a file as the source instead of a socket: what the
    client costs when no server shares its cores ("none", "inline" or "thread")."""
    sha = hashlib.sha256() if hashing != "none" else None
    buffers = (
        download.BackgroundHasher(sha, MIB)
        if hashing == "thread"
        else download.InlineHasher(sha, MIB)
    )
    with open(src, "rb", buffering=0) as f, open(dst, "xb", buffering=0) as out:
        while True:
            buffer = buffers.buffer()
            view = memoryview(buffer)
            n = f.readinto(view)
            if not n:
                buffers.give_back(buffer)
                break
            out.write(view[:n])
            buffers.submit(buffer, n)
    buffers.finish()


def bench_client_alone(portal: Portal, results: Results, work: Path) -> None:
    assert portal.stored_file is not None
    seconds: dict[str, list[float]] = {"none": [], "inline": [], "thread": []}
    names = list(seconds)
    dst = work / "copy.bin"
    for i in range(results.runs):
        for hashing in names[i % 3 :] + names[: i % 3]:
            seconds[hashing].append(timed(lambda h=hashing: local_copy(portal.stored_file, dst, h)))
            dst.unlink()
    results.seconds.update({f"local_copy_{k}": v for k, v in seconds.items()})
    results.local_copy_s = {k: statistics.median(v) for k, v in seconds.items()}


def median_rate(size: int, seconds: list[float]) -> float:
    return size / statistics.median(seconds) / 1e6


@dataclass
class Results:
    date: str
    machine: str
    file_bytes: int
    runs: int
    load_average: str = ""
    disk_read_mb_s: float = 0.0
    device_read_mb_s: float = 0.0
    portal_http_mb_s: float = 0.0
    portal_vs_disk: float = 0.0
    portal_vs_device: float = 0.0
    cli_download_verified_mb_s: float = 0.0
    resume: dict[str, int | str] = field(default_factory=dict)
    download_only_s: float = 0.0
    download_verified_s: float = 0.0
    download_verified_inline_s: float = 0.0
    verify_afterwards_s: float = 0.0
    local_copy_s: dict[str, float] = field(default_factory=dict)
    verify_overhead: float = 0.0
    verify_overhead_inline: float = 0.0
    cuts: dict[str, dict] = field(default_factory=dict)
    aria2c: dict = field(default_factory=dict)
    fingerprinted_mb: int = FINGERPRINTED_MB
    fingerprinted: dict = field(default_factory=dict)
    materialised: bool = False  # fingerprinted copies written out (WEIGHTS_FINGERPRINT_MATERIALISE)
    measured: list[str] = field(default_factory=list)
    seconds: dict[str, list[float]] = field(default_factory=dict)


def bench_throughput(portal: Portal, results: Results, work: Path) -> None:
    assert portal.stored_file is not None
    size, runs = results.file_bytes, results.runs
    read_from_disk(portal.stored_file)  # warm the page cache, as the server will find it
    warm_up_workers(portal)
    disk, http_runs, device = [], [], []
    for _ in range(runs):
        disk.append(timed(lambda: read_from_disk(portal.stored_file)))
        http_runs.append(timed(lambda: fetch_over_http(portal.file_url())))
        with contextlib.suppress(OSError):  # no O_DIRECT on this filesystem
            device.append(timed(lambda: read_direct(portal.stored_file)))
    results.seconds.update(disk_read=disk, portal_http=http_runs, device_read=device)
    results.disk_read_mb_s = median_rate(size, disk)
    results.portal_http_mb_s = median_rate(size, http_runs)
    results.portal_vs_disk = results.portal_http_mb_s / results.disk_read_mb_s
    if device:
        results.device_read_mb_s = median_rate(size, device)
        results.portal_vs_device = results.portal_http_mb_s / results.device_read_mb_s


MODES = {
    "cli_no_verify": {"verify": False},
    "cli_verified": {"verify": True, "hash_thread": True},
    "cli_verified_inline": {"verify": True, "hash_thread": False},
}


def bench_verification(portal: Portal, results: Results, work: Path) -> None:
    """The CLI without verification, with it (hashing on a second thread, the default), and
    with hashing on the receiving thread; interleaved, rotating the order, so drift in the
    machine's load hits all alike."""
    size, runs = results.file_bytes, results.runs
    dest = work / "cli"
    cli_download(portal.link, dest, download.Options())  # warm-up: imports, first connection
    shutil.rmtree(dest)
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    after: list[float] = []
    names = list(MODES)
    for i in range(runs):
        for mode in names[i % 3 :] + names[: i % 3]:
            opts = download.Options(**MODES[mode])
            seconds[mode].append(timed(lambda o=opts: cli_download(portal.link, dest, o)))
            if mode == "cli_verified":
                after.append(timed(lambda: verify_afterwards(dest / SHARD)))
            shutil.rmtree(dest)
    results.seconds.update(seconds, sha256_pass=after)
    results.download_only_s = statistics.median(seconds["cli_no_verify"])
    results.download_verified_s = statistics.median(seconds["cli_verified"])
    results.download_verified_inline_s = statistics.median(seconds["cli_verified_inline"])
    results.verify_afterwards_s = statistics.median(after)
    results.verify_overhead = results.download_verified_s / results.download_only_s
    results.verify_overhead_inline = results.download_verified_inline_s / results.download_only_s
    results.cli_download_verified_mb_s = median_rate(size, seconds["cli_verified"])


def run_cli_until(portal: Portal, dest: Path, fraction: float) -> int:
    """Run the CLI as a researcher would and kill it once .part holds `fraction` of the file."""
    part = dest / (SHARD + ".part")
    limit = int(fraction * (portal.stored_file.stat().st_size if portal.stored_file else 0))
    command = [sys.executable, "-m", "weights.download", portal.link, "--dest", str(dest)]
    process = subprocess.Popen(  # noqa: S603
        [*command, "--quiet", "--jobs", "1"], cwd=REPO
    )
    try:
        while process.poll() is None:
            if part.exists() and part.stat().st_size >= limit:
                process.kill()
                break
            time.sleep(0.002)
    finally:
        process.wait()
    return part.stat().st_size if part.exists() else -1


def bench_resume(portal: Portal, results: Results, work: Path) -> None:
    dest = work / "resume"
    before = internal(portal, "events")["count"]
    part_at_kill = run_cli_until(portal, dest, 0.5)
    time.sleep(1.0)  # let the server notice the closed socket and record the partial event
    code = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "weights.download", portal.link, "--dest", str(dest), "--quiet"],
        cwd=REPO,
        check=False,
    ).returncode
    events = internal(portal, "events")["events"][before:]
    first, resumed = events[0], events[-1]
    resume_start = _range_start(resumed["range"])
    results.resume = {
        "file_bytes": results.file_bytes,
        "part_bytes_at_kill": part_at_kill,
        "first_request_bytes_sent": first["bytes"],
        "resume_range": resumed["range"] or "(none)",
        "resume_bytes_sent": resumed["bytes"],
        "refetched_before_cut": max(0, part_at_kill - resume_start),
        "in_flight_lost_at_kill": max(0, first["bytes"] - part_at_kill),
        "total_bytes_sent": sum(e["bytes"] for e in events),
        "requests": len(events),
        "resume_exit_code": code,
        "verified": int(code == 0 and (dest / SHARD).exists()),
    }
    shutil.rmtree(dest)


def _range_start(header: str) -> int:
    if header.startswith("bytes=") and header.endswith("-"):
        return int(header[len("bytes=") : -1])
    return 0


# --------------------------------------------------------------------------- one-copy budgets

CUTS = 3
CUT_RATE_SECONDS = 8  # the rate limit lets a whole file take this long
SETTLE_S = 1.0  # for the server to see the closed socket and give back the unsent step


@dataclass(frozen=True)
class CutClient:
    """A real client that resumes when run again: its command line, the file it writes while
    downloading and the finished file (relative to its directory)."""

    name: str
    command: Callable[[str, Path, str], list[str]]  # (link, directory, rate) -> argv
    partial: str
    final: str


def cut_clients() -> list[CutClient]:
    """curl and wget where installed, and the project's CLI once it has --limit-rate."""
    name = SHARD.rsplit("/", 1)[-1]
    clients = []
    if shutil.which("curl"):
        clients.append(
            CutClient(
                "curl -C -",
                lambda link, d, rate: (
                    ["curl", "-sSf", "-C", "-", "--limit-rate", rate]
                    + ["-o", str(d / name), link + urllib.parse.quote(SHARD)]
                ),
                name,
                name,
            )
        )
    if shutil.which("wget"):
        clients.append(
            CutClient(
                "wget -c",
                lambda link, d, rate: (
                    ["wget", "-q", "-c", f"--limit-rate={rate}"]
                    + ["-P", str(d), link + urllib.parse.quote(SHARD)]
                ),
                name,
                name,
            )
        )
    cli = [sys.executable, "-m", "weights.download"]
    usage = subprocess.run([*cli, "--help"], capture_output=True, text=True, check=False)  # noqa: S603
    if "--limit-rate" in usage.stdout:
        clients.append(
            CutClient(
                "weights.download",
                lambda link, d, rate: (
                    [*cli, link, "--dest", str(d), "--quiet", "--jobs", "1"]
                    + ["--limit-rate", rate]
                ),
                SHARD + ".part",
                SHARD,
            )
        )
    return clients


def sha256_hex(path: Path) -> str:
    return download.sha256_file(path).hexdigest()


def kill_at(command: list[str], path: Path, at: int) -> int:
    """Run command and SIGKILL it once path holds `at` bytes; the bytes path holds after the
    kill (what the client really had on disk)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)  # noqa: S603
    try:
        while process.poll() is None:
            if path.exists() and path.stat().st_size >= at:
                process.kill()
                break
            time.sleep(0.002)
    finally:
        process.wait()
    return path.stat().st_size if path.exists() else 0


def cut_and_resume(portal: Portal, client: CutClient, work: Path, size: int) -> dict:
    """One shard on a fresh one-copy link: cut CUTS times (at 1/4, 2/4, 3/4), then finished."""
    issued = internal(portal, "fresh-link:1")
    link = f"{portal.base_url}/d/{issued['token']}/"
    dest = work / "cuts"
    dest.mkdir()
    rate = f"{max(1, size // CUT_RATE_SECONDS // MIB)}M"
    command = client.command(link, dest, rate)
    cuts = []
    for k in range(1, CUTS + 1):
        on_disk = kill_at(command, dest / client.partial, k * size // (CUTS + 1))
        time.sleep(SETTLE_S)
        usage = internal(portal, f"usage:{issued['link_id']}")
        cuts.append(
            {
                "on_disk": on_disk,
                "charged": usage["bytes_charged"],
                "swallowed": usage["bytes_charged"] - on_disk,
                "forgiven": usage["bytes_forgiven"],
            }
        )
    code = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, check=False).returncode  # noqa: S603
    time.sleep(SETTLE_S)
    usage = internal(portal, f"usage:{issued['link_id']}")
    final = dest / client.final
    verified = code == 0 and final.exists() and sha256_hex(final) == usage["sha256"]
    shutil.rmtree(dest)
    return {
        "rate": rate,
        "cuts": cuts,
        "exit_code": code,
        "verified": int(verified),
        "charged": usage["bytes_charged"],
        "charged_over_size": usage["bytes_charged"] - size,
        "forgiven": usage["bytes_forgiven"],
    }


def bench_cuts(portal: Portal, results: Results, work: Path) -> None:
    results.cuts = {
        c.name: cut_and_resume(portal, c, work, results.file_bytes) for c in cut_clients()
    }


ARIA2C = ["aria2c", "-x16", "-s16", "-k1M", "--quiet", "--file-allocation=none"]


def aria2c_once(portal: Portal, copies: int, work: Path) -> tuple[float, int, int]:
    """aria2c on a fresh link of `copies` copies: (seconds, exit code, bytes charged)."""
    issued = internal(portal, f"fresh-link:{copies}")
    url = f"{portal.base_url}/d/{issued['token']}/{urllib.parse.quote(SHARD)}"
    dest = work / "aria2c"
    command = [*ARIA2C, "--dir", str(dest), "--out", "shard", url]
    outcome: list[int] = []
    seconds = timed(
        lambda: outcome.append(
            subprocess.run(command, stdout=subprocess.DEVNULL, check=False, timeout=600).returncode  # noqa: S603
        )
    )
    time.sleep(SETTLE_S)
    usage = internal(portal, f"usage:{issued['link_id']}")
    if outcome[0] == 0 and sha256_hex(dest / "shard") != usage["sha256"]:
        outcome[0] = -1  # finished but wrong bytes
    shutil.rmtree(dest, ignore_errors=True)
    return seconds, outcome[0], usage["bytes_charged"]


def bench_aria2c(portal: Portal, results: Results, work: Path) -> None:
    """aria2c -x16 on one-copy and five-copy links, interleaved, alternating the order; the
    rates are medians of the runs that finished with the right bytes."""
    if not shutil.which("aria2c"):
        results.aria2c = {"skipped": "aria2c is not installed"}
        return
    assert portal.stored_file is not None
    read_from_disk(portal.stored_file)  # as bench_throughput does: the server finds it warm
    warm_up_workers(portal)
    size = results.file_bytes
    runs: dict[int, list[tuple[float, int, int]]] = {1: [], 5: []}
    for i in range(results.runs):
        for copies in (1, 5) if i % 2 == 0 else (5, 1):
            runs[copies].append(aria2c_once(portal, copies, work))
    results.seconds.update({f"aria2c_{c}_copies": [r[0] for r in v] for c, v in runs.items()})
    rates = {c: [size / r[0] / 1e6 for r in v if r[1] == 0] for c, v in runs.items()}
    one, five = (statistics.median(rates[c]) if rates[c] else 0.0 for c in (1, 5))
    results.aria2c = {
        "one_copy_mb_s": one,
        "five_copies_mb_s": five,
        "ratio": one / five if five else 0.0,
        "completed": {str(c): len(rates[c]) for c in runs},
        "exit_codes": {str(c): [r[1] for r in v] for c, v in runs.items()},
        "one_copy_charged_over_size": [r[2] - size for r in runs[1]],
        "five_copies_charged_over_size": [r[2] - size for r in runs[5]],
    }


# --------------------------------------------------------------------------- fingerprinted


def checkpoint_shapes(size: int) -> tuple[dict[str, int], list[tuple[str, tuple[int, ...]]]]:
    """(params.json, LLaMA tensors in a checkpoint's order) of about `size` bytes of bf16:
    the width is the power of two whose layer takes about a quarter of it, as many layers
    as fit, every tensor with LLaMA's name and shape (2-D weights are what is marked)."""
    dim = 64
    while dim < 4096 and 24 * (2 * dim) ** 2 <= size / 4:
        dim *= 2
    hidden = 256 * -(-8 * dim // 3 // 256)  # LLaMA's rule, multiple_of 256
    vocab = 32000 if dim >= 1024 else 16 * dim
    layer = [
        *((f"attention.{w}.weight", (dim, dim)) for w in ("wq", "wk", "wv", "wo")),
        ("feed_forward.w1.weight", (hidden, dim)),
        ("feed_forward.w2.weight", (dim, hidden)),
        ("feed_forward.w3.weight", (hidden, dim)),
        ("attention_norm.weight", (dim,)),
        ("ffn_norm.weight", (dim,)),
    ]
    layer_bytes = 2 * sum(math.prod(s) for _, s in layer)
    layers = max(1, round((size - 4 * vocab * dim) / layer_bytes))
    tensors = [("tok_embeddings.weight", (vocab, dim))]
    for i in range(layers):
        tensors += [(f"layers.{i}.{name}", shape) for name, shape in layer]
    tensors += [("norm.weight", (dim,)), ("output.weight", (vocab, dim))]
    params = {"dim": dim, "n_layers": layers, "n_heads": max(1, dim // 128), "vocab_size": vocab}
    return {**params, "multiple_of": 256, "norm_eps": 1e-05}, tensors


def write_checkpoint(directory: Path, size: int) -> Path:
    """A loadable, fingerprintable Meta-layout checkpoint (params.json, one bf16
    consolidated.00.pth, checklist.chk) of random LLaMA-shaped weights, written by the
    project's own writer; the shard's path."""
    import torch

    from inference_demo.llama.checkpoint import save_checkpoint

    params, tensors = checkpoint_shapes(size)
    gen = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if len(shape) == 2
        else torch.ones(shape, dtype=torch.bfloat16)
        for name, shape in tensors
    }
    [shard] = save_checkpoint(directory, params, state)
    return shard


def warm_up_urls(urls: list[str], rounds: int = 3) -> None:
    """1-byte range requests, several at once so that every worker takes some: a worker's
    first fingerprinted request also imports the fingerprint code and reads the layout."""
    from concurrent.futures import ThreadPoolExecutor

    def one(url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        conn.request("GET", parts.path, headers={"Range": "bytes=0-0"})
        if conn.getresponse().read() is None:
            raise RuntimeError(url)
        conn.close()

    with ThreadPoolExecutor(max_workers=2 * WORKERS) as pool:
        for _ in range(rounds):
            list(pool.map(one, urls * WORKERS))


def server_cpu_s(portal: Portal) -> float:
    """User + system CPU seconds of gunicorn and its workers so far (Linux /proc; 0 elsewhere)."""
    if portal.server is None or not Path("/proc/self/stat").exists():
        return 0.0
    master, total = portal.server.pid, 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(stat.parent.name) == master or int(fields[1]) == master:
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def sha256_over_http(url: str) -> str:
    sha = hashlib.sha256()
    fetch_over_http(url, sha.update)
    return sha.hexdigest()


def bench_fingerprinted(portal: Portal, results: Results, work: Path) -> None:
    """One checkpoint published twice, as a plain release and as a fingerprinted one; one
    researcher approved for both (the approval prepares their copy); both files fetched
    over HTTP, alternating which goes first; the fingerprinted bytes checked against the
    grantee's RecipientCopy.sha256."""
    size = results.fingerprinted_mb * MIB
    source = portal.root / "fp-release"
    t0 = time.perf_counter()
    write_checkpoint(source / "7B", size)
    generated_s = time.perf_counter() - t0
    for slug, extra in ((PLAIN_SLUG, []), (FP_SLUG, ["--fingerprinted"])):
        manage(
            portal, "publish_release", str(source), "--slug", slug, "--no-transformers",
            "-v", "0", *extra,
        )  # fmt: skip
    shutil.rmtree(source)
    issued = internal(portal, "fingerprinted-links")
    urls = {
        kind: f"{portal.base_url}/d/{issued[kind]['token']}/{urllib.parse.quote(SHARD)}"
        for kind in ("plain", "fingerprinted")
    }
    read_from_disk(Path(issued["stored_file"]))  # one stored file serves both releases
    warm_up_urls(list(urls.values()))
    served = {kind: sha256_over_http(url) for kind, url in urls.items()}
    seconds: dict[str, list[float]] = {"plain": [], "fingerprinted": []}
    cpu: dict[str, list[float]] = {"plain": [], "fingerprinted": []}
    for i in range(results.runs):
        for kind in ("plain", "fingerprinted") if i % 2 == 0 else ("fingerprinted", "plain"):
            before = server_cpu_s(portal)
            seconds[kind].append(timed(lambda u=urls[kind]: fetch_over_http(u)))
            cpu[kind].append(server_cpu_s(portal) - before)
    file_bytes = issued["size"]
    plain, fingerprinted = (median_rate(file_bytes, seconds[k]) for k in seconds)
    pairs = [p / f for p, f in zip(seconds["plain"], seconds["fingerprinted"], strict=True)]
    results.seconds.update({f"{k}_http": v for k, v in seconds.items()})
    results.seconds.update({f"{k}_server_cpu": v for k, v in cpu.items()})
    results.fingerprinted = {
        "file_bytes": file_bytes,
        "fingerprinted_bytes_fraction": issued["fingerprinted_bytes_fraction"],
        "plain_mb_s": plain,
        "fingerprinted_mb_s": fingerprinted,
        "ratio": fingerprinted / plain,
        "ratio_per_pair_median": statistics.median(pairs),
        "target": FP_TARGET,
        "met": fingerprinted / plain >= FP_TARGET,
        "sha256_matches_recipient_copy": served["fingerprinted"] == issued["copy_sha256"],
        "differs_from_published": served["fingerprinted"] != issued["published_sha256"],
        "plain_sha256_matches_published": served["plain"] == issued["published_sha256"],
        # CPU seconds the server spent per GB sent: the cost of fingerprinting itself, less
        # disturbed than wall time by whatever else shares the machine's cores.
        "server_cpu_s_per_gb": {k: statistics.median(v) * 1e9 / file_bytes for k, v in cpu.items()},
        "approve_and_prepare_s": issued["approve_and_prepare_s"],
        "generate_s": generated_s,
    }


# --------------------------------------------------------------------------- helpers in Django


def _internal_issue_link() -> dict:
    """A licensed, approved researcher with a fresh link to the bench release."""
    from django.contrib.auth import get_user_model

    from access.services.applications import application_save_draft, application_submit
    from access.services.licenses import license_accept, license_publish
    from access.services.reviewers import reviewers_group_ensure
    from access.services.reviews import application_approve
    from weights.models import Release
    from weights.services.links import link_issue
    from weights.storage import get_storage

    users = get_user_model().objects
    license_version = license_publish(
        name="LLaMA Noncommercial Research License", version="bench", text="Research use only."
    )
    release = Release.objects.get(slug=SLUG)
    Release.objects.filter(pk=release.pk).update(license=license_version)
    reviewer = users.create_user("rita", "rita@portal.example.org", is_staff=True)
    reviewer.groups.add(reviewers_group_ensure())
    grants = {}
    for name in ("bench", BUDGET_USER):
        researcher = users.create_user(name, f"{name}@uni.example.edu", secrets.token_urlsafe(16))
        _verify_email(researcher)
        fields = {**_FIELDS, "institutional_email": researcher.email}
        draft = application_save_draft(applicant=researcher, fields=fields, releases=[release])
        acceptance = license_accept(
            user=researcher, license_version=license_version, ip_address=None
        )
        application = application_submit(
            application=draft, applicant=researcher, license_acceptance=acceptance
        )
        [grants[name]] = application_approve(
            application=application, reviewer=reviewer, releases=[release]
        )
    issued = link_issue(grant=grants["bench"], budget_copies=50)
    artifact = release.artifacts.get(path=SHARD)
    stored = get_storage().local_path(artifact.storage_key)
    return {"token": issued.token, "stored_file": str(stored)}


def _internal_fingerprinted_links() -> dict:
    """A researcher approved for the plain and the fingerprinted release by the normal path
    (the approval's task prepares their copy before it emails the link), then a link to
    each; the checksums to verify the served bytes against."""
    from django.contrib.auth import get_user_model

    from access.services.applications import application_save_draft, application_submit
    from access.services.licenses import license_accept
    from access.services.reviews import application_approve
    from weights.fingerprint.layout import meta_layout
    from weights.models import RecipientCopy, Release
    from weights.services.links import link_issue
    from weights.storage import get_storage

    license_version = Release.objects.get(slug=SLUG).license
    Release.objects.filter(slug__in=[PLAIN_SLUG, FP_SLUG]).update(license=license_version)
    releases = [Release.objects.get(slug=PLAIN_SLUG), Release.objects.get(slug=FP_SLUG)]
    reviewer = get_user_model().objects.get(username="rita")
    researcher = get_user_model().objects.create_user(
        FP_USER, f"{FP_USER}@uni.example.edu", secrets.token_urlsafe(16)
    )
    _verify_email(researcher)
    fields = {**_FIELDS, "institutional_email": researcher.email}
    draft = application_save_draft(applicant=researcher, fields=fields, releases=releases)
    acceptance = license_accept(user=researcher, license_version=license_version, ip_address=None)
    application = application_submit(
        application=draft, applicant=researcher, license_acceptance=acceptance
    )
    t0 = time.perf_counter()
    grants = application_approve(application=application, reviewer=reviewer, releases=releases)
    prepare_s = time.perf_counter() - t0
    by_slug = {g.release.slug: g for g in grants}
    plain, fingerprinted = (r.artifacts.get(path=SHARD) for r in releases)
    copy = RecipientCopy.objects.get(
        grant=by_slug[FP_SLUG], artifact=fingerprinted, state=RecipientCopy.State.READY
    )
    stored = get_storage().local_path(fingerprinted.storage_key)
    layout = meta_layout(stored, shard_index=0, n_shards=1)
    return {
        "plain": {"token": link_issue(grant=by_slug[PLAIN_SLUG], budget_copies=50).token},
        "fingerprinted": {"token": link_issue(grant=by_slug[FP_SLUG], budget_copies=50).token},
        "stored_file": str(stored),
        "same_stored_file": plain.storage_key == fingerprinted.storage_key,
        "size": fingerprinted.size,
        "published_sha256": fingerprinted.sha256,
        "copy_sha256": copy.sha256,
        "fingerprinted_bytes_fraction": sum(e.nbytes for e in layout.fingerprinted) / layout.size,
        "approve_and_prepare_s": prepare_s,
    }


def _internal_fresh_link(copies: str) -> dict:
    """A fresh link of `copies` copies for the second researcher: issuing a link revokes the
    grant's previous one, and the first researcher's link must stay live for the others."""
    from access.models import Grant
    from weights.services.links import link_issue

    grant = Grant.objects.get(user__username=BUDGET_USER, release__slug=SLUG)
    issued = link_issue(grant=grant, budget_copies=int(copies))
    return {"token": issued.token, "link_id": issued.link.pk}


def _internal_usage(link_id: str) -> dict:
    from weights.models import LinkUsage

    usage = LinkUsage.objects.select_related("artifact").get(
        link_id=int(link_id), artifact__path=SHARD
    )
    return {
        "bytes_charged": usage.bytes_charged,
        "bytes_forgiven": usage.bytes_forgiven,
        "size": usage.artifact.size,
        "sha256": usage.artifact.sha256,
    }


def _verify_email(user) -> None:
    from allauth.account.models import EmailAddress

    EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)


_FIELDS = {
    "full_name": "Bench Researcher",
    "institutional_email": "bench@uni.example.edu",
    "affiliation": "University of Example",
    "organisation_type": "academic",
    "country": "GB",
    "role": "Postdoctoral researcher",
    "intended_use": "Measuring how fast the portal serves weights over loopback.",
}


def _internal_events() -> dict:
    from weights.models import DownloadEvent

    rows = DownloadEvent.objects.filter(artifact__release__slug=SLUG, artifact__path=SHARD)
    rows = rows.order_by("pk")
    events = [
        {"range": e.range_header, "bytes": e.bytes, "status": e.status_code, "outcome": e.outcome}
        for e in rows
    ]
    return {"count": len(events), "events": events}


def run_internal(command: str) -> None:
    """`name` or `name:argument`, e.g. `fresh-link:1`, `usage:7`."""
    import django

    django.setup()
    handlers = {
        "issue-link": _internal_issue_link,
        "events": _internal_events,
        "fresh-link": _internal_fresh_link,
        "usage": _internal_usage,
        "fingerprinted-links": _internal_fingerprinted_links,
    }
    name, _, argument = command.partition(":")
    print(json.dumps(handlers[name](argument) if argument else handlers[name]()))


# --------------------------------------------------------------------------- report


def machine() -> str:
    cores = os.cpu_count() or 0
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores}-core {platform.machine()}, {memory:.0f} GiB RAM, loopback, Python {platform.python_version()}"


def summary_lines(r: Results) -> Iterator[str]:
    size = (
        f"{r.file_bytes / 2**30:.2f} GiB"
        if r.file_bytes >= 2**30
        else f"{r.file_bytes / MIB:.0f} MiB"
    )
    yield f"weights download benchmark, {r.date}, {r.machine}; file {size}, median of {r.runs}"
    yield f"  machine load average: {r.load_average}"
    if "throughput" in r.measured:
        yield from _throughput_lines(r)
    if "resume" in r.measured:
        yield from _resume_lines(r)
    if "verification" in r.measured:
        yield from _verification_lines(r)
    if "cuts" in r.measured:
        yield from cut_lines(r)
    if "aria2c" in r.measured:
        yield from aria2c_lines(r)
    if "fingerprinted" in r.measured:
        yield from fingerprinted_lines(r)


def _throughput_lines(r: Results) -> Iterator[str]:
    yield f"  disk read (1 MiB chunks, page cache)      {r.disk_read_mb_s:8.0f} MB/s"
    yield f"  device read (O_DIRECT, 1 MiB, no cache)   {r.device_read_mb_s:8.0f} MB/s"
    yield (
        f"  portal over HTTP (gunicorn, loopback)     {r.portal_http_mb_s:8.0f} MB/s"
        f"  = {100 * r.portal_vs_disk:.0f} % of the page-cache read,"
        f" {100 * r.portal_vs_device:.0f} % of the device read (target >= 80 %)"
    )
    if "verification" in r.measured:
        yield f"  CLI download + SHA-256 + write to disk    {r.cli_download_verified_mb_s:8.0f} MB/s"


def _resume_lines(r: Results) -> Iterator[str]:
    s = r.resume
    yield (
        f"  resume after kill at {s['part_bytes_at_kill']} B on disk: asked {s['resume_range']},"
        f" re-fetched before the cut {s['refetched_before_cut']} B (target 0);"
        f" lost in flight at the kill {s['in_flight_lost_at_kill']} B; verified={bool(s['verified'])}"
    )


def _verification_lines(r: Results) -> Iterator[str]:
    yield (
        f"  CLI download alone {r.download_only_s:.2f} s, with verification "
        f"{r.download_verified_s:.2f} s = {r.verify_overhead:.2f}x (target < 1.2x);"
        f" hashing inline instead of on a thread {r.download_verified_inline_s:.2f} s"
        f" = {r.verify_overhead_inline:.2f}x; a separate SHA-256 pass afterwards"
        f" {r.verify_afterwards_s:.2f} s"
    )
    c = r.local_copy_s
    yield (
        f"  client alone (file -> .part, no server on the cores): copy {c['none']:.2f} s,"
        f" + SHA-256 on a thread {c['thread']:.2f} s = {c['thread'] / c['none']:.2f}x,"
        f" inline {c['inline']:.2f} s = {c['inline'] / c['none']:.2f}x"
    )


def cut_lines(r: Results) -> Iterator[str]:
    for name, c in r.cuts.items():
        swallowed = ", ".join(f"{cut['swallowed']} B" for cut in c["cuts"])
        yield (
            f"  one-copy link, {name} --limit-rate {c['rate']}, {len(c['cuts'])} x SIGKILL +"
            f" resume: charged minus on disk at each cut {swallowed};"
            f" charged minus size at the end {c['charged_over_size']} B (target 0,"
            f" at most {SLACK} B); forgiven {c['forgiven']} B; verified={bool(c['verified'])}"
        )
    if not r.cuts:
        yield "  one-copy cuts: skipped (no resuming client installed: curl, wget)"


def aria2c_lines(r: Results) -> Iterator[str]:
    a = r.aria2c
    if "skipped" in a:
        yield f"  aria2c -x16 at 1 copy vs 5 copies: skipped ({a['skipped']})"
        return
    done, codes = a["completed"], a["exit_codes"]
    yield (
        f"  aria2c -x16 -s16 -k1M, 1 copy / 5 copies    {a['one_copy_mb_s']:5.0f} /"
        f" {a['five_copies_mb_s']:.0f} MB/s = {a['ratio']:.2f} (target ~1.0);"
        f" runs finished and verified {done['1']}/{len(codes['1'])} and"
        f" {done['5']}/{len(codes['5'])} (exit codes {codes['1']} / {codes['5']});"
        f" charged minus size at 1 copy {a['one_copy_charged_over_size']} B"
        f" (at most {SLACK} B), at 5 copies {a['five_copies_charged_over_size']} B"
    )


def fingerprinted_lines(r: Results) -> Iterator[str]:
    f = r.fingerprinted
    yield (
        f"  fingerprinted checkpoint{' (copies materialised)' if r.materialised else ''}"
        f" ({f['file_bytes']} B, bf16,"
        f" {100 * f['fingerprinted_bytes_fraction']:.1f} % of its bytes in marked tensors)"
        f" over HTTP: plain {f['plain_mb_s']:.0f} MB/s, fingerprinted {f['fingerprinted_mb_s']:.0f}"
        f" MB/s = {100 * f['ratio']:.0f} % (target >= {100 * f['target']:.0f} %;"
        f" median of per-run pairs {100 * f['ratio_per_pair_median']:.0f} %)"
    )
    c = f["server_cpu_s_per_gb"]
    yield (
        f"  server CPU per GB sent: plain {c['plain']:.2f} s, fingerprinted"
        f" {c['fingerprinted']:.2f} s"
    )
    yield (
        f"  served fingerprinted bytes = the grantee's RecipientCopy.sha256:"
        f" {f['sha256_matches_recipient_copy']}; differ from the published file:"
        f" {f['differs_from_published']}; plain bytes = the published sha256:"
        f" {f['plain_sha256_matches_published']}; approval + preparing the copy"
        f" {f['approve_and_prepare_s']:.1f} s"
    )


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def figures_markdown(r: Results) -> str:
    s, c = r.resume, r.local_copy_s
    rows = [
        (
            "read from disk, 1 MiB chunks (page cache warm)",
            f"{r.disk_read_mb_s:.0f} MB/s",
            "baseline",
        ),
        (
            "read from the device, O_DIRECT 1 MiB reads (cache bypassed, not dropped)",
            f"{r.device_read_mb_s:.0f} MB/s",
            "baseline",
        ),
        (
            "through the portal (gunicorn) over HTTP, client discards",
            f"{r.portal_http_mb_s:.0f} MB/s = {100 * r.portal_vs_disk:.0f} % of the page-cache"
            f" read, {100 * r.portal_vs_device:.0f} % of the device read",
            ">= 80 %",
        ),
        (
            "CLI: download + SHA-256 + write `.part` + rename",
            f"{r.cli_download_verified_mb_s:.0f} MB/s",
            "",
        ),
        (
            "resume after the CLI was killed at ~50 %: bytes before the cut fetched again",
            f"{s['refetched_before_cut']} B",
            "0",
        ),
        (
            "CLI with verification / without",
            f"{r.download_verified_s:.2f} s / {r.download_only_s:.2f} s = {r.verify_overhead:.2f}x",
            "< 1.2x",
        ),
        (
            "same, hashing on the receiving thread",
            f"{r.download_verified_inline_s:.2f} s = {r.verify_overhead_inline:.2f}x",
            "",
        ),
        ("a separate SHA-256 pass over the finished file", f"{r.verify_afterwards_s:.2f} s", ""),
        (
            "client alone (file in page cache -> `.part`, no server): copy / + SHA-256 on a"
            " thread / + SHA-256 inline",
            f"{c['none']:.2f} s / {c['thread']:.2f} s ({c['thread'] / c['none']:.2f}x) /"
            f" {c['inline']:.2f} s ({c['inline'] / c['none']:.2f}x)",
            "",
        ),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""{BEGIN}
Measured {r.date} on {r.machine}; load average {r.load_average}.
File: one generated shard of {r.file_bytes} bytes; medians of {r.runs} runs.

| measure | figure | target |
| --- | --- | --- |
{table}

Resume, from the portal's own DownloadEvents: killed with {s["part_bytes_at_kill"]} B in `.part`;
the first request had sent {s["first_request_bytes_sent"]} B ({s["in_flight_lost_at_kill"]} B were
in socket buffers when the process died and never reached the disk); the resume asked for
`{s["resume_range"]}` and was sent {s["resume_bytes_sent"]} B; {s["requests"]} requests,
{s["total_bytes_sent"]} B sent in all; resumed file verified: {bool(s["verified"])}.

```
{chr(10).join(summary_lines(r))}
{json.dumps(asdict(r))}
```
{END}"""


def measured_markdown(r: Results, lines: Iterator[str], runs: str, file: str = "") -> str:
    """The block of a measure run on its own: when, where, and its lines of the summary."""
    file = file or f"one generated shard of {r.file_bytes} bytes"
    return (
        f"Measured {r.date} on {r.machine}; load average {r.load_average}.\n"
        f"File: {file}; {runs}.\n\n"
        f"```\n{chr(10).join(lines)}\n```"
    )


def blocks(r: Results) -> Iterator[tuple[str, str, str]]:
    """(begin marker, end marker, block) for each group of measures this run made."""
    if {"throughput", "verification", "resume"} <= set(r.measured):
        yield BEGIN, END, figures_markdown(r)
    checkpoint = (
        f"a generated bf16 checkpoint of {r.fingerprinted.get('file_bytes')} bytes, published"
        " plain and fingerprinted"
    )
    own = (
        ("cuts", cut_lines, f"one download per client, cut {CUTS} times", ""),
        ("aria2c", aria2c_lines, f"{r.runs} runs at each budget", ""),
        ("fingerprinted", fingerprinted_lines, f"medians of {r.runs} runs each", checkpoint),
    )
    for name, lines, runs, file in own:
        if name in r.measured:
            begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
            block = measured_markdown(r, lines(r), runs, file)
            yield begin, end, f"{begin}\n{block}\n{end}"


def record(path: Path, r: Results) -> None:
    """Replace the figures between the markers in path (the prose around them stays); the
    blocks of measures this run did not make stay as they were."""
    text = path.read_text() if path.exists() else "# Download benchmark\n"
    for begin, end, block in blocks(r):
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# --------------------------------------------------------------------------- main


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


MEASURES: dict[str, Callable[[Portal, Results, Path], None]] = {
    "throughput": bench_throughput,
    "verification": lambda p, r, w: (bench_verification(p, r, w), bench_client_alone(p, r, w)),
    "resume": bench_resume,
    "cuts": bench_cuts,
    "aria2c": bench_aria2c,
    "fingerprinted": bench_fingerprinted,
}


def run(
    size_mb: int | None,
    runs: int,
    keep: bool,
    only: list[str] | None = None,
    materialise: bool = False,
) -> Results:
    """The measures named in `only` (default: all); `size_mb` None is each one's default."""
    root = Path(tempfile.mkdtemp(prefix="weights-bench-"))
    generic_mb = size_mb or 1024
    if only is not None and set(only) <= {"fingerprinted"}:
        generic_mb = 1  # the generic release serves no measure then: keep it small
    results = Results(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
        file_bytes=generic_mb * MIB,
        runs=runs,
        fingerprinted_mb=size_mb or FINGERPRINTED_MB,
        materialised=materialise,
    )
    portal = Portal(root=root, env={})
    load_before = _load()
    try:
        print(f"setting up a portal under {root} ...", file=sys.stderr)
        portal = build_portal(root, results.file_bytes // MIB, materialise)
        start_server(portal)
        work = root / "work"
        work.mkdir()
        for name, measure in MEASURES.items():
            if only is None or name in only:
                print(f"{name} ...", file=sys.stderr)
                measure(portal, results, work)
                results.measured.append(name)
        results.load_average = f"{load_before} at start, {_load()} at end (1-minute)"
    finally:
        stop_server(portal)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--size-mb",
        type=int,
        help=f"file size in MiB (default 1024; {FINGERPRINTED_MB} for the fingerprinted checkpoint)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per measure (median; default 3)")
    parser.add_argument("--record", type=Path, help="also write the figures to this Markdown file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary portal directory")
    parser.add_argument(
        "--only",
        type=lambda v: v.split(","),
        help=f"only these measures, comma-separated: {','.join(MEASURES)} (default: all)",
    )
    parser.add_argument(
        "--materialise",
        action="store_true",
        help="fingerprinted copies written out once per grantee, then served as stored files",
    )
    parser.add_argument("--internal", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.internal:
        run_internal(args.internal)
        return 0
    if args.only and not set(args.only) <= set(MEASURES):
        parser.error(f"--only takes {','.join(MEASURES)}")
    results = run(args.size_mb, args.runs, args.keep, args.only, args.materialise)
    for line in summary_lines(results):
        print(line)
    if args.record:
        record(args.record, results)
    print(json.dumps(asdict(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
