"""Download a model release from a portal download link, resuming and verifying every file.

Usage::

    python -m weights.download URL [--dest DIR] [--include GLOB ...] [--jobs N]
                               [--retries N] [--limit-rate RATE] [--quiet]

URL is the link from the email: the landing page ``https://host/d/<token>/``, its
``manifest.json``, or the classic ``https://host/d/<token>/*`` form. The downloader reads the
manifest, keeps the files matching ``--include`` (shell patterns on paths such as ``7B/*``;
repeatable; default: every file), checks the free disk space, then fetches the files in
parallel. Each file is written to ``<dest>/<path>.part``, resumed with an HTTP Range request when
a ``.part`` is already there, hashed while it streams, and renamed to its final name only once
its SHA-256 matches the manifest. Files already present with the right SHA-256 are skipped
without a request; an empty file needs none either: its ``.part`` is created empty and goes
through the same check. Transient errors (refused or reset connections, timeouts, truncated
bodies, 5xx) are retried with exponential backoff, resuming where the transfer stopped.
``--limit-rate`` (bytes per second, with wget's suffixes: ``500k``, ``16M``) caps the whole run,
every parallel file together, so a download leaves room on the network for other work. A
refusal from the portal (expired, revoked, budget spent, invalid link) stops everything at once:
the server's explanation is printed and partial files stay in place for a later resume.

This module uses only the Python standard library, plus ``tqdm`` for progress bars when it is
installed (plain progress lines otherwise): copy the file and run ``python download.py URL``.

Exit codes:

====  ===========================================================================
 0    every selected file is present and its SHA-256 verified
 1    some files failed (checksum mismatch, retries exhausted, unexpected reply)
 2    usage error (bad URL or arguments, no file matches --include)
 3    not enough free disk space for the bytes still to fetch
 4    the manifest is malformed or unsafe (absolute path or ``..`` in a path)
 5    the portal could not be reached (manifest not fetched after the retries)
10    the link expired (HTTP 410)
11    access refused: link or grant revoked, or license must be accepted (HTTP 403)
12    the link's download budget is spent (HTTP 429)
13    the link or file does not exist (HTTP 404)
130   interrupted (Ctrl-C); run the same command again to resume
====  ===========================================================================
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import hashlib
import http.client
import json
import os
import posixpath
import queue
import random
import re
import shutil
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

try:  # optional: plain progress lines without it
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None

__version__ = "1.0"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DISK = 3
EXIT_MANIFEST = 4
EXIT_UNREACHABLE = 5
EXIT_EXPIRED = 10
EXIT_FORBIDDEN = 11
EXIT_BUDGET = 12
EXIT_NOT_FOUND = 13
EXIT_INTERRUPTED = 130

REFUSAL_EXIT = {410: EXIT_EXPIRED, 403: EXIT_FORBIDDEN, 429: EXIT_BUDGET, 404: EXIT_NOT_FOUND}
REFUSAL_TITLE = {
    410: "the download link has expired",
    403: "access refused",
    429: "the link's download budget is spent",
    404: "the link or file was not found",
}

CHUNK_SIZE = 1024 * 1024
TIMEOUT_S = 60.0
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
USER_AGENT = f"llama-portal-downloader/{__version__} (python-urllib)"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_LINK = re.compile(r"^(?P<base>.*?/d/[^/]+)(?:/.*)?$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)$", re.IGNORECASE)
RATE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}  # wget's: powers of 1024


# --------------------------------------------------------------------------- errors


class DownloadError(Exception):
    """A failure that ends the whole run with `exit_code`."""

    exit_code = EXIT_FAILED


class UsageError(DownloadError):
    exit_code = EXIT_USAGE


class DiskSpaceError(DownloadError):
    exit_code = EXIT_DISK


class ManifestError(DownloadError):
    exit_code = EXIT_MANIFEST


class UnreachableError(DownloadError):
    exit_code = EXIT_UNREACHABLE


class Refused(DownloadError):
    """The portal refused the link (410/403/429/404): stop everything, never retry."""

    def __init__(self, status: int, detail: str, action_url: str) -> None:
        super().__init__(f"{REFUSAL_TITLE.get(status, 'refused')} (HTTP {status})")
        self.status = status
        self.detail = detail
        self.action_url = action_url
        self.exit_code = REFUSAL_EXIT.get(status, EXIT_FAILED)


class TransientError(Exception):
    """Worth retrying: the transfer resumes from the bytes already on disk."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RangeRejected(TransientError):
    """HTTP 416 on a resume: the .part does not fit the file any more; start over."""


class FileFailed(Exception):
    """This file cannot be completed in this run (the others go on)."""


class Cancelled(Exception):
    """Another file hit a refusal or the user interrupted; stop quietly."""


# --------------------------------------------------------------------------- URLs and tokens


@dataclass(frozen=True)
class Link:
    manifest_url: str
    token: str

    def redact(self, text: str) -> str:
        """Replace the token, wherever it appears, by its masked form."""
        return redact(text, self.token)


def mask_token(token: str) -> str:
    return token[:4] + "…" if len(token) > 8 else "…"


def redact(text: str, token: str) -> str:
    if not token:
        return text
    quoted = urllib.parse.quote(token, safe="")
    for form in {token, quoted}:
        text = text.replace(form, mask_token(token))
    return text


def parse_link(url: str) -> Link:
    """Normalise a landing, manifest, download.sh or `.../d/<token>/*` URL to the manifest URL."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(
            "the URL must start with http:// or https:// (paste the link from the email)"
        )
    match = _LINK.match(parts.path)
    if match is not None:
        base = match["base"]
        token = urllib.parse.unquote(base.rsplit("/", 1)[1])
    elif parts.path.endswith("/manifest.json"):
        base, token = parts.path[: -len("/manifest.json")], ""
    else:
        raise UsageError("this does not look like a download link (expected .../d/<token>/)")
    if token in ("", "*", "manifest.json", "download.sh"):
        raise UsageError("the link has no token (expected .../d/<token>/)")
    manifest = urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, base + "/manifest.json", "", "")
    )
    return Link(manifest_url=manifest, token=token)


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str
    url: str
    remaining_bytes: int | None = None


@dataclass(frozen=True)
class Manifest:
    release: str
    name: str
    expires_at: str
    files: tuple[RemoteFile, ...]


def check_relative_path(path: str) -> str:
    """Return a manifest path if it is a plain relative path; raise ManifestError otherwise."""
    if not isinstance(path, str) or not path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ManifestError(f"unsafe path in manifest: {path!r}")
    if "\\" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ManifestError(f"unsafe path in manifest (absolute): {path!r}")
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise ManifestError(f"unsafe path in manifest ('..' or empty segment): {path!r}")
    if posixpath.normpath(path) != path:
        raise ManifestError(f"unsafe path in manifest: {path!r}")
    return path


def target_path(dest: Path, path: str) -> Path:
    """Where a manifest path lands under dest; never outside it."""
    check_relative_path(path)
    target = dest.joinpath(*path.split("/"))
    root = os.path.abspath(dest)
    if os.path.commonpath([root, os.path.abspath(target)]) != root:
        raise ManifestError(f"unsafe path in manifest (outside the destination): {path!r}")
    return target


def _remote_file(entry: Any, manifest_url: str) -> RemoteFile:
    if not isinstance(entry, dict):
        raise ManifestError("manifest entry is not an object")
    path = check_relative_path(entry.get("path"))
    size, sha256 = entry.get("size"), str(entry.get("sha256", "")).lower()
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"manifest entry {path!r} has no valid size")
    if not _SHA256.match(sha256):
        raise ManifestError(f"manifest entry {path!r} has no valid sha256")
    url = entry.get("url") or urllib.parse.urljoin(manifest_url, urllib.parse.quote(path))
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ManifestError(f"manifest entry {path!r} has no valid url")
    remaining = entry.get("remaining_bytes")
    remaining = (
        remaining if isinstance(remaining, int) and not isinstance(remaining, bool) else None
    )
    return RemoteFile(path=path, size=size, sha256=sha256, url=url, remaining_bytes=remaining)


def parse_manifest(data: Any, manifest_url: str) -> Manifest:
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ManifestError("the manifest is not a JSON object with a list of files")
    files = tuple(_remote_file(entry, manifest_url) for entry in data["files"])
    seen: set[str] = set()
    for f in files:
        if f.path in seen:
            raise ManifestError(f"manifest lists {f.path!r} twice")
        seen.add(f.path)
    return Manifest(
        release=str(data.get("release", "")),
        name=str(data.get("name", "")),
        expires_at=str(data.get("expires_at", "")),
        files=files,
    )


def select_files(files: Iterable[RemoteFile], patterns: Sequence[str]) -> list[RemoteFile]:
    if not patterns:
        return list(files)
    return [f for f in files if any(fnmatch.fnmatchcase(f.path, p) for p in patterns)]


# --------------------------------------------------------------------------- HTTP


def _request(url: str, *, offset: int = 0, timeout: float = TIMEOUT_S) -> http.client.HTTPResponse:
    """Open a GET; raise Refused, TransientError or FileFailed for error statuses."""
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json, */*;q=0.5"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as exc:
        raise _http_error(exc, url) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise FileFailed(f"the server's TLS certificate is not valid: {reason}") from None
        raise TransientError(f"connection failed: {reason}") from None


def _http_error(exc: urllib.error.HTTPError, url: str) -> Exception:
    status = exc.code
    redirected = urllib.parse.urlsplit(exc.url or url).netloc != urllib.parse.urlsplit(url).netloc
    if status in REFUSAL_EXIT and redirected:
        # Object storage behind a portal redirect (an S3 presigned GET, clock skew...): asking
        # the portal again mints a fresh URL; the portal itself still decides about access.
        return TransientError(f"storage answered HTTP {status}")
    if status in REFUSAL_EXIT:
        detail, action_url = _refusal_body(exc)
        return Refused(status, detail, action_url)
    if status >= 500 or status == 408:
        return TransientError(f"server error HTTP {status}", _retry_after(exc))
    if status == 416:
        return RangeRejected("the server refused the resume range (HTTP 416)")
    return FileFailed(f"unexpected reply HTTP {status}")


def _refusal_body(exc: urllib.error.HTTPError) -> tuple[str, str]:
    try:
        raw = exc.read(64 * 1024)
    except (OSError, http.client.HTTPException):
        raw = b""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500], ""
    if not isinstance(data, dict):
        return text[:500], ""
    detail = str(data.get("detail") or data.get("error") or "")
    action_url = str(data.get("action_url") or "")
    if action_url:
        action_url = urllib.parse.urljoin(exc.url or "", action_url)
    return detail, action_url


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = exc.headers.get("Retry-After", "") if exc.headers else ""
    return float(value) if value.isdigit() else None


def fetch_manifest(link: Link, *, retries: int, backoff: float) -> Manifest:
    def attempt() -> Manifest:
        with _request(link.manifest_url) as response:
            raw = response.read(16 * 1024 * 1024)
        try:
            return parse_manifest(json.loads(raw), link.manifest_url)
        except ValueError as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError("the manifest is not valid JSON") from None

    for n in range(retries + 1):
        try:
            return attempt()
        except TransientError as exc:
            if n == retries:
                raise UnreachableError(f"could not fetch the manifest: {exc}") from None
            time.sleep(backoff_delay(n + 1, backoff, exc.retry_after))
        except FileFailed as exc:
            raise UnreachableError(f"could not fetch the manifest: {exc}") from None
    raise AssertionError("unreachable")


def backoff_delay(attempt: int, base: float, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter: base, 2·base, 4·base… capped; honours Retry-After."""
    delay = min(BACKOFF_MAX_S, base * 2 ** (attempt - 1))
    delay *= 0.5 + random.random() / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, BACKOFF_MAX_S))
    return delay


def _content_range_start(response: http.client.HTTPResponse, size: int) -> int | None:
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
    if match is None or match[3] not in (str(size), "*") or int(match[2]) != size - 1:
        return None
    return int(match[1])


# --------------------------------------------------------------------------- progress


class Reporter:
    """Progress and messages; thread-safe. The base class prints nothing but errors."""

    def __init__(self, total: int = 0, initial: int = 0) -> None:
        self.lock = threading.Lock()
        self.total = total
        self.done = initial

    def start(self, path: str, size: int, initial: int) -> None:
        pass

    def advance(self, path: str, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes

    def rewind(self, path: str, nbytes: int) -> None:
        """Bytes counted before that will be fetched again (the server restarted from zero)."""
        with self.lock:
            self.done -= nbytes

    def finish(self, path: str) -> None:
        pass

    def abandon(self, path: str) -> None:
        """The file stops here without being verified (error or cancel)."""

    def info(self, text: str) -> None:
        pass

    def error(self, text: str) -> None:
        with self.lock:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class PlainReporter(Reporter):
    """One line per event and a total every few seconds (no tqdm, or not a terminal)."""

    INTERVAL_S = 5.0

    def __init__(self, total: int = 0, initial: int = 0) -> None:
        super().__init__(total, initial)
        self._last = time.monotonic()

    def start(self, path: str, size: int, initial: int) -> None:
        verb = f"resuming at {human(initial)}" if initial else "fetching"
        self.info(f"{path}: {verb} of {human(size)}")

    def advance(self, path: str, nbytes: int) -> None:
        super().advance(path, nbytes)
        now = time.monotonic()
        if now - self._last >= self.INTERVAL_S:
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            self.info(f"total: {human(self.done)} of {human(self.total)} ({pct:.0f}%)")

    def finish(self, path: str) -> None:
        self.info(f"{path}: verified")

    def info(self, text: str) -> None:
        with self.lock:
            print(text, file=sys.stderr, flush=True)


class TqdmReporter(Reporter):
    """A bar for the total and one per file being fetched."""

    def __init__(self, total: int = 0, initial: int = 0, slots: int = 4) -> None:
        super().__init__(total, initial)
        assert _tqdm is not None
        kw: dict[str, Any] = {"unit": "B", "unit_scale": True, "unit_divisor": 1024}
        self._total_bar = _tqdm(total=total, initial=initial, desc="total", position=0, **kw)
        self._kw = kw
        self._free = list(range(1, slots + 1))
        self._bars: dict[str, Any] = {}

    def start(self, path: str, size: int, initial: int) -> None:
        with self.lock:
            position = self._free.pop(0) if self._free else len(self._bars) + 1
            self._bars[path] = _tqdm(
                total=size,
                initial=initial,
                desc=_short(path),
                position=position,
                leave=False,
                **self._kw,
            )

    def advance(self, path: str, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            self._total_bar.update(nbytes)
            bar = self._bars.get(path)
            if bar is not None:
                bar.update(nbytes)

    def rewind(self, path: str, nbytes: int) -> None:
        with self.lock:
            self.done -= nbytes
            self._total_bar.update(-nbytes)
            bar = self._bars.get(path)
            if bar is not None:
                bar.reset(total=bar.total)

    def finish(self, path: str) -> None:
        self._drop(path)
        self.info(f"{path}: verified")

    def abandon(self, path: str) -> None:
        self._drop(path)

    def _drop(self, path: str) -> None:
        with self.lock:
            bar = self._bars.pop(path, None)
            if bar is not None:
                self._free.append(bar.pos if bar.pos > 0 else abs(bar.pos))
                self._free.sort()
                bar.close()

    def info(self, text: str) -> None:
        with self.lock:
            _tqdm.write(text, file=sys.stderr)

    def error(self, text: str) -> None:
        self.info(text)

    def close(self) -> None:
        for path in list(self._bars):
            self._drop(path)
        self._total_bar.close()


def _short(path: str, width: int = 28) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def make_reporter(*, quiet: bool, total: int, initial: int, slots: int) -> Reporter:
    if quiet:
        return Reporter(total, initial)
    if _tqdm is not None and sys.stderr.isatty():
        return TqdmReporter(total, initial, slots)
    return PlainReporter(total, initial)


# --------------------------------------------------------------------------- planning


@dataclass
class Job:
    remote: RemoteFile
    target: Path
    part: Path
    offset: int = 0  # bytes already in .part
    complete: bool = False
    hasher: Any = None  # sha256 of the first `hashed` bytes of .part
    hashed: int = 0

    @property
    def to_fetch(self) -> int:
        return 0 if self.complete else self.remote.size - self.offset


def sha256_file(path: Path, limit: int | None = None) -> Any:
    """A sha256 object fed with the first `limit` bytes (all when None) of a file."""
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    left = limit
    with open(path, "rb", buffering=0) as f:
        while left is None or left > 0:
            n = f.readinto(view if left is None or left >= CHUNK_SIZE else view[:left])
            if not n:
                break
            hasher.update(view[:n])
            if left is not None:
                left -= n
    return hasher


def _already_complete(target: Path, remote: RemoteFile) -> bool:
    return (
        target.is_file()
        and target.stat().st_size == remote.size
        and sha256_file(target).hexdigest() == remote.sha256
    )


def plan_job(remote: RemoteFile, dest: Path) -> Job:
    """Look at what is on disk: a verified final file, a partial .part, or nothing."""
    target = target_path(dest, remote.path)
    job = Job(remote=remote, target=target, part=target.with_name(target.name + ".part"))
    if _already_complete(target, remote):
        job.complete = True
        return job
    if job.part.is_file():
        size = job.part.stat().st_size
        if size > remote.size:
            job.part.unlink()
        else:
            job.offset = size
    return job


def plan(files: Sequence[RemoteFile], dest: Path, jobs: int) -> list[Job]:
    """Plan every file, hashing existing complete files in parallel."""
    for remote in files:
        target_path(dest, remote.path)  # refuse an unsafe manifest before touching anything
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda r: plan_job(r, dest), files))


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_disk_space(dest: Path, needed: int) -> None:
    where = existing_ancestor(dest)
    free = shutil.disk_usage(where).free
    if needed > free:
        raise DiskSpaceError(
            f"not enough disk space in {where}: {human(needed)} still to download, "
            f"{human(free)} free. Free up {human(needed - free)} or choose --dest elsewhere."
        )


# --------------------------------------------------------------------------- transfer


def parse_rate(value: str) -> int:
    """Bytes per second from `16M`, `500k`, `1.5m` or `65536` (suffixes as wget's)."""
    match = _RATE.match(value.strip())
    if match is None:
        raise ValueError(f"not a rate in bytes per second: {value!r} (e.g. 500k, 16M)")
    rate = int(float(match[1]) * RATE_UNITS[match[2].lower()])
    if rate < 1:
        raise ValueError("the rate must be at least 1 byte per second")
    return rate


class RateLimit:
    """At most `rate` bytes per second for the whole run, shared by every parallel file.

    Each chunk received moves one shared due time on by its size / rate, and the receiver
    waits until then before reading on: the files together keep to the rate, and time spent
    idle earns no burst. Reads are cut to about a twentieth of a second's worth, so the
    bytes arrive evenly rather than a whole buffer at a time."""

    def __init__(self, rate: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.read_size = max(4096, min(CHUNK_SIZE, rate // 20))
        self._clock = clock
        self._lock = threading.Lock()
        self._due = 0.0

    def delay(self, nbytes: int) -> float:
        """Seconds to wait, having just received `nbytes`."""
        with self._lock:
            now = self._clock()
            self._due = max(self._due, now) + nbytes / self.rate
            return self._due - now


@dataclass
class Options:
    retries: int = 5
    backoff: float = BACKOFF_BASE_S
    timeout: float = TIMEOUT_S
    chunk_size: int = CHUNK_SIZE
    verify: bool = True  # only the benchmark turns this off, to time the transfer alone
    hash_thread: bool = True  # hash on a second thread, overlapping the transfer
    limit: RateLimit | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


def _hasher_for(job: Job) -> Any:
    """A sha256 of the bytes already in .part, reusing the running one when it still matches."""
    if job.hasher is not None and job.hashed == job.offset:
        return job.hasher
    job.hasher = sha256_file(job.part, job.offset) if job.offset else hashlib.sha256()
    job.hashed = job.offset
    return job.hasher


def _restart(job: Job, reporter: Reporter) -> None:
    reporter.rewind(job.remote.path, job.offset)
    job.offset, job.hasher, job.hashed = 0, None, 0


def fetch_once(job: Job, opts: Options, reporter: Reporter) -> None:
    """One attempt: request from job.offset, stream into .part, hashing. Raises on failure."""
    size = job.remote.size
    if job.offset < size:
        try:
            response = _request(job.remote.url, offset=job.offset, timeout=opts.timeout)
        except RangeRejected:
            _restart(job, reporter)
            raise
        with response:
            start = _response_start(job, response, reporter)
            hasher = _hasher_for(job) if opts.verify else None
            with _open_part(job.part, start) as out:
                _stream(job, response, out, hasher, opts, reporter)
    elif size == 0:
        _open_part(job.part, 0).close()  # an empty file has no bytes to ask for
    _finalise(job, opts)


def _open_part(part: Path, start: int) -> IO[bytes]:
    """.part opened for writing at `start`. Starting over makes a new file rather than
    truncating the old one: ext4 flushes a file truncated to zero when it is closed
    (auto_da_alloc), which would cost a synchronous write of everything downloaded."""
    part.parent.mkdir(parents=True, exist_ok=True)
    if start == 0:
        part.unlink(missing_ok=True)
        return open(part, "xb", buffering=0)  # noqa: SIM115 - returned to a with block
    out = open(part, "r+b", buffering=0)  # noqa: SIM115
    out.seek(start)
    if os.fstat(out.fileno()).st_size > start:
        out.truncate()
    return out


def _response_start(job: Job, response: http.client.HTTPResponse, reporter: Reporter) -> int:
    """Where the body starts: job.offset for a matching 206, 0 for a 200 (start over)."""
    if response.status == 206 and job.offset:
        start = _content_range_start(response, job.remote.size)
        if start == job.offset:
            return start
        raise TransientError(
            f"the server answered the resume with a different range (start {start})"
        )
    if response.status == 200:
        if job.offset:
            reporter.info(f"{job.remote.path}: the server does not resume; starting over")
            _restart(job, reporter)
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != job.remote.size:
            raise FileFailed(
                f"the server sends {length} bytes, the manifest says {job.remote.size}"
            )
        return 0
    raise FileFailed(f"unexpected reply HTTP {response.status}")


class BackgroundHasher:
    """Feeds a SHA-256 on its own thread, so hashing overlaps receiving and writing.

    Chunks are read into buffers taken from a small pool and handed over once written; a
    buffer comes back to the pool when it has been hashed (hashlib releases the GIL).
    """

    def __init__(self, sha: Any, chunk_size: int, depth: int = 4) -> None:
        self._sha = sha
        self._todo: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(bytearray(chunk_size))
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def buffer(self) -> bytearray:
        return self._free.get()

    def give_back(self, buffer: bytearray) -> None:
        self._free.put(buffer)

    def submit(self, buffer: bytearray, n: int) -> None:
        self._todo.put((buffer, n))

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buffer, n = item
            self._sha.update(memoryview(buffer)[:n])
            self._free.put(buffer)

    def finish(self) -> Any:
        """Wait until every submitted chunk is hashed; return the sha256 object."""
        self._todo.put(None)
        self._thread.join()
        return self._sha


class InlineHasher:
    """The same interface, hashing on the receiving thread (fewer threads: better on a
    machine with no idle core); with sha=None it does not hash at all."""

    def __init__(self, sha: Any, chunk_size: int) -> None:
        self._sha = sha
        self._buffer = bytearray(chunk_size)

    def buffer(self) -> bytearray:
        return self._buffer

    def give_back(self, buffer: bytearray) -> None:
        pass

    def submit(self, buffer: bytearray, n: int) -> None:
        if self._sha is not None:
            self._sha.update(memoryview(buffer)[:n])

    def finish(self) -> Any:
        return self._sha


def _write_all(out: IO[bytes], chunk: memoryview) -> None:
    while chunk:
        written = out.write(chunk)
        chunk = chunk[written or 0 :]


def _stream(
    job: Job,
    response: http.client.HTTPResponse,
    out: IO[bytes],
    hasher: Any,
    opts: Options,
    reporter: Reporter,
) -> None:
    """Copy the body into .part from job.offset on; every byte written is hashed, also when
    this raises (job.hasher then covers exactly job.offset bytes, ready for a resume)."""
    if hasher is not None and opts.hash_thread:
        buffers: BackgroundHasher | InlineHasher = BackgroundHasher(hasher, opts.chunk_size)
    else:
        buffers = InlineHasher(hasher, opts.chunk_size)
    try:
        _copy(job, response, out, buffers, opts, reporter)
    finally:
        if hasher is not None:
            job.hasher, job.hashed = buffers.finish(), job.offset


def _copy(
    job: Job,
    response: http.client.HTTPResponse,
    out: IO[bytes],
    buffers: BackgroundHasher | InlineHasher,
    opts: Options,
    reporter: Reporter,
) -> None:
    size = job.remote.size
    read_size = opts.limit.read_size if opts.limit is not None else opts.chunk_size
    while job.offset < size:
        if opts.cancel.is_set():
            raise Cancelled()
        buffer = buffers.buffer()
        view = memoryview(buffer)[: min(len(buffer), read_size, size - job.offset)]
        try:
            n = response.readinto(view)
        except (OSError, http.client.HTTPException) as exc:
            buffers.give_back(buffer)
            raise TransientError(f"transfer interrupted at {human(job.offset)}: {exc!r}") from None
        if not n:
            buffers.give_back(buffer)
            raise TransientError(f"connection closed after {human(job.offset)} of {human(size)}")
        try:
            _write_all(out, view[:n])
        except BaseException:
            buffers.give_back(buffer)
            raise
        buffers.submit(buffer, n)
        job.offset += n
        reporter.advance(job.remote.path, n)
        if opts.limit is not None and opts.cancel.wait(opts.limit.delay(n)):
            raise Cancelled()


def _finalise(job: Job, opts: Options) -> None:
    """Check the SHA-256 of .part and give it its final name, or delete it."""
    if opts.verify:
        digest = _hasher_for(job).hexdigest()
        if digest != job.remote.sha256:
            job.part.unlink(missing_ok=True)
            job.offset, job.hasher, job.hashed = 0, None, 0
            raise FileFailed(
                f"SHA-256 mismatch (expected {job.remote.sha256[:16]}…, got {digest[:16]}…); "
                "the partial file was deleted, run the command again to download it afresh"
            )
    os.replace(job.part, job.target)
    job.complete = True


def fetch_file(job: Job, opts: Options, reporter: Reporter) -> None:
    """Fetch one file with retries; progress resets the retry count."""
    if opts.cancel.is_set():
        raise Cancelled()
    reporter.start(job.remote.path, job.remote.size, job.offset)
    failures = 0
    try:
        while True:
            before = job.offset
            try:
                fetch_once(job, opts, reporter)
                break
            except TransientError as exc:
                failures = 1 if job.offset > before else failures + 1
                if failures > opts.retries:
                    raise FileFailed(f"giving up after {opts.retries} retries: {exc}") from None
                delay = backoff_delay(failures, opts.backoff, exc.retry_after)
                reporter.info(f"{job.remote.path}: {exc}; retrying in {delay:.1f}s")
                if opts.cancel.wait(delay):
                    raise Cancelled() from None
    except Refused:
        opts.cancel.set()  # at once, before this worker picks up the next file
        reporter.abandon(job.remote.path)
        raise
    except BaseException:
        reporter.abandon(job.remote.path)
        raise
    reporter.finish(job.remote.path)


# --------------------------------------------------------------------------- orchestration


@dataclass
class Outcome:
    verified: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    refusal: Refused | None = None


def run_jobs(jobs: list[Job], workers: int, opts: Options, reporter: Reporter) -> Outcome:
    outcome = Outcome(skipped=[j.remote.path for j in jobs if j.complete])
    pending = [j for j in jobs if not j.complete]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(fetch_file, j, opts, reporter): j for j in pending}
        for future in concurrent.futures.as_completed(futures):
            _collect(futures[future], future, outcome, opts)
    except BaseException:
        opts.cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return outcome


def _collect(
    job: Job, future: concurrent.futures.Future[None], outcome: Outcome, opts: Options
) -> None:
    path = job.remote.path
    try:
        future.result()
        outcome.verified.append(path)
    except Refused as exc:
        if outcome.refusal is None:
            outcome.refusal = exc
        opts.cancel.set()
    except Cancelled:
        pass
    except FileFailed as exc:
        outcome.failed[path] = str(exc)
    except OSError as exc:  # local disk problems: full disk, permissions
        outcome.failed[path] = f"local error: {exc}"
    except Exception as exc:  # a bug or a reply we did not foresee: fail this file, not the run
        outcome.failed[path] = f"unexpected error: {exc!r}"


def download(
    url: str,
    *,
    dest: Path,
    include: Sequence[str] = (),
    jobs: int = 4,
    opts: Options | None = None,
    quiet: bool = False,
) -> tuple[int, Outcome]:
    """Download the selected files of a link into dest; return (exit code, outcome)."""
    opts = opts or Options()
    link = parse_link(url)
    manifest = fetch_manifest(link, retries=opts.retries, backoff=opts.backoff)
    selected = select_files(manifest.files, include)
    if not selected:
        raise UsageError(
            "no file in the manifest matches " + " ".join(include)
            if include
            else "the manifest lists no files"
        )
    planned = plan(selected, dest, jobs)
    needed = sum(j.to_fetch for j in planned)
    check_disk_space(dest, needed)
    total = sum(j.remote.size for j in planned)
    reporter = make_reporter(quiet=quiet, total=total, initial=total - needed, slots=jobs)
    reporter.info(
        f"{manifest.name or manifest.release}: {len(planned)} files, {human(total)}; "
        f"{human(needed)} to download into {dest}"
        + (f"; link valid until {manifest.expires_at}" if manifest.expires_at else "")
    )
    _warn_budget(planned, reporter)
    try:
        outcome = run_jobs(planned, jobs, opts, reporter)
    finally:
        reporter.close()
    return _exit_code(outcome), outcome


def _warn_budget(jobs: Iterable[Job], reporter: Reporter) -> None:
    for job in jobs:
        left = job.remote.remaining_bytes
        if not job.complete and left is not None and left < job.to_fetch:
            reporter.info(
                f"warning: the link has {human(left)} of budget left for {job.remote.path}, "
                f"which needs {human(job.to_fetch)}; the portal may refuse it"
            )


def _exit_code(outcome: Outcome) -> int:
    if outcome.refusal is not None:
        return outcome.refusal.exit_code
    return EXIT_FAILED if outcome.failed else EXIT_OK


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m weights.download" if __package__ else "python download.py",
        description="Download and verify model weights from a portal download link.",
        epilog="Run the same command again to resume an interrupted download.",
    )
    parser.add_argument("url", help="the download link (…/d/<token>/), its manifest.json or …/*")
    parser.add_argument("--dest", type=Path, default=Path("."), help="directory (default: .)")
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files whose path matches this shell pattern, e.g. '7B/*' (repeatable)",
    )
    parser.add_argument("--jobs", type=_positive, default=4, help="parallel files (default: 4)")
    parser.add_argument(
        "--retries", type=_non_negative, default=5, help="retries per file (default: 5)"
    )
    parser.add_argument(
        "--limit-rate",
        type=_rate,
        metavar="RATE",
        help="at most RATE bytes per second for the whole run, all files together; "
        "suffixes k, M, G as with wget (500k, 16M; default: no limit)",
    )
    parser.add_argument("--quiet", action="store_true", help="print errors and the summary only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _rate(value: str) -> int:
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


def _report(outcome: Outcome, link: Link, quiet: bool) -> None:
    out = sys.stderr
    for path, reason in sorted(outcome.failed.items()):
        print(link.redact(f"FAILED {path}: {reason}"), file=out)
    if outcome.refusal is not None:
        _print_refusal(outcome.refusal, link)
    if not quiet or outcome.failed or outcome.refusal:
        print(
            f"{len(outcome.verified)} downloaded and verified, {len(outcome.skipped)} already "
            f"complete, {len(outcome.failed)} failed",
            file=out,
        )


def _print_refusal(exc: Refused, link: Link) -> None:
    print(link.redact(f"Stopped: {exc}."), file=sys.stderr)
    if exc.detail:
        print(link.redact(exc.detail), file=sys.stderr)
    if exc.action_url:
        print(link.redact(f"What to do: {exc.action_url}"), file=sys.stderr)
    print("Partial files were kept; the same command resumes with a working link.", file=sys.stderr)


def main(argv: Sequence[str] | None = None, *, opts: Options | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = opts or Options()
    opts.retries = args.retries
    if args.limit_rate is not None:
        opts.limit = RateLimit(args.limit_rate)
    token = ""
    try:
        link = parse_link(args.url)
        token = link.token
        code, outcome = download(
            args.url, dest=args.dest, include=args.include, jobs=args.jobs, opts=opts,
            quiet=args.quiet,
        )  # fmt: skip
    except Refused as exc:
        _print_refusal(exc, Link("", token))
        return exc.exit_code
    except DownloadError as exc:
        print(redact(f"error: {exc}", token), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        opts.cancel.set()
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    _report(outcome, link, args.quiet)
    return code


if __name__ == "__main__":
    sys.exit(main())
