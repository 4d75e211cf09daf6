"""The `load` scenario: the file endpoint next to the trivial view, in three serving modes.

Each mode is its own gunicorn run, and the trivial view is measured in that same run with
the same client (50 keep-alive connections), so each ratio compares like with like:

- local streaming: Django sends the bytes (small file GETs and 64 KiB Range GETs into
  64 MiB shards), measured quiet and again with 20 full shard downloads alongside;
- X-Accel: WEIGHTS_X_ACCEL_PREFIX set, Django authorises and answers with the
  X-Accel-Redirect header and an empty body. No nginx is in the loop, so this is the
  portal's share of an nginx deployment, not what a client of nginx would see;
- S3 redirect: WEIGHTS_STORAGE=s3 against the private moto, every file request answered
  302 to a presigned URL, which the client does not follow.
"""

from __future__ import annotations

from collections.abc import Callable

from prove import load
from prove.s3 import s3_publish, s3_start
from prove.stack import Service, http_get

SLUG = "llama-7b"
SHARDS = 4
SHARD_MB = 64
CLIENTS = 50
TARGET = 0.40
X_ACCEL_PREFIX = "/protected-weights/"
MIRROR_SLUG = "llama-7b-s3-mirror"  # the same files published into the bucket
LABELS = {
    "local": "local streaming (Django sends the bytes)",
    "x_accel": "X-Accel: Django authorises, answers X-Accel-Redirect + empty body "
    "(nginx not in the loop)",
    "s3_redirect": "S3 redirect: 302 to a presigned moto URL (not followed)",
}

Check = Callable[[int, dict, bytes], bool]  # (status, headers, body) -> as expected


def needs_s(load_seconds: int) -> int:
    """What the scenario takes: seven measurements over three server runs, plus start-ups."""
    short = max(10, load_seconds // 3)
    return 7 * short + load_seconds + 60


def _ratio(part: dict, whole: dict) -> float:
    return round(part["rps"] / whole["rps"], 3) if whole["rps"] else 0.0


def _precheck(port: int, mix: list[load.Request], check: Check) -> None:
    """Every request kind must answer as the mode says once before it is timed."""
    for request in mix[:2]:
        status, headers, body = http_get(port, request.path, request.headers)
        if not check(status, headers, body):
            raise RuntimeError(
                f"GET {request.path} answered {status} {sorted(headers)} before the load"
            )


def _trivial_path(port: int) -> str:
    return "/healthz" if http_get(port, "/healthz")[0] == 200 else "/_prove/trivial/"


def _measure(run, port: int, requests: list[load.Request], seconds: int, expect=None) -> dict:
    return load.measure(
        port, requests, seconds=seconds, clients=CLIENTS, workdir=run.stack.root, expect=expect
    )


def _local(run, server: Service, mix, tokens: list[str], short: int) -> dict:
    port = server.port
    _precheck(port, mix, lambda status, headers, body: status in (200, 206) and len(body) > 0)
    trivial_path = _trivial_path(port)
    trivial = _measure(run, port, [load.Request(trivial_path)], short)
    quiet = _measure(run, port, mix, short)
    landing = _measure(run, port, load.landing_mix(tokens[1:]), short)
    shard_paths = [f"7B/consolidated.{i:02d}.pth" for i in range(SHARDS)]
    seconds = run.args.load_seconds
    downloads = load.ShardDownloads(
        port,
        [f"/d/{tokens[0]}/{p}" for p in shard_paths],
        SHARD_MB * load.MIB,
        count=20,
        seconds=max(1, seconds - 5),
    )
    downloads.start()
    busy = _measure(run, port, mix, seconds)
    shards = downloads.join(timeout=120)
    ratio = _ratio(busy, trivial)
    return {
        "label": LABELS["local"],
        "trivial_path": trivial_path,
        "trivial": trivial,
        "file": quiet,
        "file_with_shards": busy,
        "landing": landing,
        "shard_downloads": shards,
        "ratio": ratio,
        "ratio_quiet": _ratio(quiet, trivial),
        "ratio_landing": _ratio(landing, trivial),
        "met": ratio >= TARGET and busy["errors"] == 0 and shards["complete"] == shards["shards"],
    }


def _authorising(run, server: Service, mix, mode: str, check: Check, expect, short: int):
    """X-Accel and S3: the portal authorises and hands the bytes to someone else."""
    port = server.port
    _precheck(port, mix, check)
    trivial_path = _trivial_path(port)
    trivial = _measure(run, port, [load.Request(trivial_path)], short)
    files = _measure(run, port, mix, short, expect=expect)
    ratio = _ratio(files, trivial)
    return {
        "label": LABELS[mode],
        "trivial_path": trivial_path,
        "trivial": trivial,
        "file": files,
        "ratio": ratio,
        "met": ratio >= TARGET and files["errors"] == 0,
    }


def load_scenario(run) -> dict:
    stack = run.stack
    short = max(10, run.args.load_seconds // 3)
    tokens = [link["token"] for link in run.data["links"]]
    shard_paths = [f"7B/consolidated.{i:02d}.pth" for i in range(SHARDS)]
    mix = load.file_mix(tokens[1:], shard_paths, SHARD_MB * load.MIB)
    modes: dict[str, dict] = {}

    server = stack.start_gunicorn(stack.env())
    try:
        modes["local"] = _local(run, server, mix, tokens, short)
    finally:
        server.stop()

    def accel(status: int, headers: dict, body: bytes) -> bool:
        target = headers.get("X-Accel-Redirect", "")
        return status in (200, 206) and target.startswith(X_ACCEL_PREFIX) and body == b""

    server = stack.start_gunicorn(stack.env(WEIGHTS_X_ACCEL_PREFIX=X_ACCEL_PREFIX))
    try:
        modes["x_accel"] = _authorising(run, server, mix, "x_accel", accel, None, short)
    finally:
        server.stop()

    env = s3_start(stack)
    try:
        s3_publish(stack, env, run.data["release_dir"], MIRROR_SLUG)
        moto = env["WEIGHTS_S3_ENDPOINT_URL"] + "/"

        def redirect(status: int, headers: dict, body: bytes) -> bool:
            return status == 302 and headers.get("Location", "").startswith(moto)

        server = stack.start_gunicorn(env)
        try:
            modes["s3_redirect"] = _authorising(
                run, server, mix, "s3_redirect", redirect, frozenset({302}), short
            )
        finally:
            server.stop()
    finally:
        stack.stop_moto()

    return {
        "status": "ok" if all(m["met"] for m in modes.values()) else "target missed",
        "modes": modes,
        "target": f">= {TARGET:.2f} of the trivial view's req/s with 0 errors in every mode "
        "(local: with 20/20 shard downloads complete alongside)",
        "trivial": "measured in each mode's own gunicorn run, same client",
        "gunicorn": "gthread, 2 workers x 8 threads",
        "clients": CLIENTS,
        "links": len(tokens) - 1,
        "database": "private PostgreSQL 15, DATABASE_CONN_MAX_AGE=60 (portal default)",
    }
