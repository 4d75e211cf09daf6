"""Load clients and request mixes: the file endpoint next to a trivial Django view.

Client: `wrk` when installed (C, event loop: it costs little of the two shared cores),
else a thread pool of keep-alive http.client connections. Either way the trivial view is
measured with the same client in the same server run, so a client bottleneck would show
as a low trivial figure, not as a low ratio. `run_once` sends a fixed list of requests
exactly once (the launch-day scenario), where the cyclic clients loop for a duration.
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
RANGE_BYTES = 64 * 1024
Expect = frozenset[int] | None  # the statuses that count as success; None: below 400


@dataclass
class Request:
    path: str
    headers: dict[str, str] = field(default_factory=dict)


def file_mix(tokens: list[str], shard_paths: list[str], shard_size: int, n: int = 600):
    """The file endpoint as a download client uses it: small file GETs (params.json) and
    64 KiB Range GETs at random offsets into the shards, half and half."""
    rng = random.Random(7)
    requests = []
    for i in range(n):
        token = tokens[i % len(tokens)]
        if i % 2 == 0:
            requests.append(Request(f"/d/{token}/7B/params.json"))
        else:
            start = rng.randrange(0, shard_size - RANGE_BYTES)
            requests.append(
                Request(
                    f"/d/{token}/{rng.choice(shard_paths)}",
                    {"Range": f"bytes={start}-{start + RANGE_BYTES - 1}"},
                )
            )
    return requests


def landing_mix(tokens: list[str]) -> list[Request]:
    """The download landing page of each link (an HTML page with the file table)."""
    return [Request(f"/d/{token}/") for token in tokens]


def _lua(requests: list[Request]) -> str:
    lines = ["local reqs = {}"]
    for r in requests:
        headers = ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in r.headers.items())
        lines.append(f'reqs[#reqs + 1] = wrk.format("GET", {json.dumps(r.path)}, {{{headers}}})')
    lines.append(
        """
local i = 0
function setup(thread)
  thread:set("offset", i * 97)
  i = i + 1
end
function init(args)
  n = offset or 0
end
function request()
  n = n + 1
  return reqs[(n % #reqs) + 1]
end
function done(summary, latency, requests)
  local codes = string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %d}',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean)
  io.write("WRKJSON " .. codes .. "\\n")
end
"""
    )
    return "\n".join(lines)


def run_wrk(port: int, requests: list[Request], *, seconds: int, clients: int, workdir: Path):
    script = workdir / f"wrk-{time.monotonic_ns()}.lua"
    script.write_text(_lua(requests))
    command = [
        "wrk",
        "-t2",
        f"-c{clients}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}",
    ]
    result = subprocess.run(  # noqa: S603
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {result.stdout[-500:]} {result.stderr[-500:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    errors = (
        raw["connect_errors"]
        + raw["read_errors"]
        + raw["write_errors"]
        + raw["status_errors"]
        + raw["timeouts"]
    )
    duration = raw["duration_us"] / 1e6
    return {
        "client": "wrk",
        "clients": clients,
        "seconds": round(duration, 1),
        "requests": raw["requests"],
        "rps": round(raw["requests"] / duration, 1),
        "errors": errors,
        "error_detail": {
            k: raw[k]
            for k in (
                "connect_errors",
                "read_errors",
                "write_errors",
                "status_errors",
                "timeouts",
            )
        },
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p95_ms": round(raw["p95_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
        "max_ms": round(raw["max_us"] / 1000, 2),
    }


Pick = Callable[[int], Request | None]  # client number -> its next request, None: done


def _drive(port: int, pick: Pick, *, seconds: float, clients: int, expect: Expect) -> dict:
    """`clients` threads, one keep-alive connection each, asking for `pick(k)` until it says
    None or time is up; a status not in `expect` (default: any below 400) is an error."""
    ok = (lambda status: status in expect) if expect else (lambda status: status < 400)
    deadline = time.monotonic() + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    statuses: list[Counter] = [Counter() for _ in range(clients)]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < deadline and (r := pick(k)) is not None:
            t0 = time.perf_counter()
            try:
                conn.request("GET", r.path, headers=r.headers)
                resp = conn.getresponse()
                resp.read()
                statuses[k][resp.status] += 1
                if not ok(resp.status):
                    errors[k] += 1
            except (OSError, http.client.HTTPException):
                statuses[k][0] += 1
                errors[k] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            latencies[k].append(time.perf_counter() - t0)
        conn.close()

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    duration = time.monotonic() - start
    flat = sorted(x for xs in latencies for x in xs)
    q = statistics.quantiles(flat, n=100) if len(flat) > 1 else [0.0] * 99
    return {
        "client": "python-threads",
        "clients": clients,
        "seconds": round(duration, 1),
        "requests": len(flat),
        "rps": round(len(flat) / duration, 1),
        "errors": sum(errors),
        "statuses": {str(code): n for code, n in sorted(sum(statuses, Counter()).items())},
        "p50_ms": round(q[49] * 1000, 2),
        "p95_ms": round(q[94] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "max_ms": round(flat[-1] * 1000, 2) if flat else 0,
    }


def run_python(
    port: int, requests: list[Request], *, seconds: int, clients: int, expect: Expect = None
) -> dict:
    """Fallback client: each thread cycles through `requests` from its own offset."""
    position = [k * 97 for k in range(clients)]

    def pick(k: int) -> Request:
        position[k] += 1
        return requests[position[k] % len(requests)]

    return _drive(port, pick, seconds=seconds, clients=clients, expect=expect)


def run_once(
    port: int, requests: list[Request], *, seconds: float, clients: int, expect: Expect = None
) -> dict:
    """Each request exactly once, in the given order, shared by `clients` threads; stops
    early at `seconds`. `seconds` in the result is the time until the last one answered."""
    queue = iter(requests)
    lock = threading.Lock()

    def pick(k: int) -> Request | None:
        with lock:
            return next(queue, None)

    result = _drive(port, pick, seconds=seconds, clients=clients, expect=expect)
    return {**result, "planned": len(requests), "complete": result["requests"] == len(requests)}


def measure(
    port: int,
    requests: list[Request],
    *,
    seconds: int,
    clients: int,
    workdir: Path,
    expect: Expect = None,
):
    """wrk when installed (it counts statuses >= 400 as errors), else the thread client,
    which also checks `expect`."""
    if shutil.which("wrk"):
        return run_wrk(port, requests, seconds=seconds, clients=clients, workdir=workdir)
    return run_python(port, requests, seconds=seconds, clients=clients, expect=expect)


class ShardDownloads:
    """`count` full GETs of large shards, spread over `seconds`, at most `parallel` at once."""

    def __init__(self, port: int, urls: list[str], size: int, *, count: int, seconds: int):
        self.port, self.urls, self.size = port, urls, size
        self.count, self.seconds = count, seconds
        self.results: list[dict] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _one(self, i: int) -> None:
        t0 = time.perf_counter()
        received, status, error = 0, 0, ""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            conn.request("GET", self.urls[i % len(self.urls)])
            resp = conn.getresponse()
            status = resp.status
            while chunk := resp.read(MIB):
                received += len(chunk)
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        with self._lock:
            self.results.append(
                {
                    "status": status,
                    "bytes": received,
                    "complete": status == 200 and received == self.size and not error,
                    "seconds": round(seconds, 2),
                    "error": error,
                }
            )

    def _run(self) -> None:
        interval = self.seconds / self.count
        with ThreadPoolExecutor(4) as pool:
            for i in range(self.count):
                pool.submit(self._one, i)
                time.sleep(interval)

    def join(self, timeout: float) -> dict:
        self._thread.join(timeout)
        done = list(self.results)
        mib_s = [r["bytes"] / MIB / r["seconds"] for r in done if r["seconds"] > 0]
        return {
            "shards": self.count,
            "shard_mib": self.size // MIB,
            "finished": len(done),
            "complete": sum(r["complete"] for r in done),
            "failed": [r for r in done if not r["complete"]][:5],
            "median_mib_s": round(statistics.median(mib_s), 1) if mib_s else None,
        }
