"""The `launch` scenario: launch day, 500 grantees each fetching 8 shards as aria2c -x16 does.

500 grantees x 8 shards x 16 range requests = 64,000 authorisations against one portal
(gunicorn, the private PostgreSQL) in S3 redirect mode: each range is answered 302 to a
presigned URL and no byte flows through the portal, so what is measured is the
authorisation itself (link check, budget UPDATE, lease, presign, event journal). Each
grantee has its own link with a budget of one copy and asks for the 16 equal ranges of
each shard; 50 keep-alive clients take all 64,000 requests in one random order over
grantees. Afterwards the books must balance: every (link, shard) charged exactly the
shard's size, and one DownloadEvent per request once the journal is flushed.
"""

from __future__ import annotations

import random
import time

from prove import load
from prove.s3 import s3_publish, s3_start

GRANTEES = 500
SHARDS = 8
SHARD_MB = 8  # only authorisations are measured; the bytes never pass through the portal
SEGMENTS = 16  # aria2c -x16: sixteen connections, one equal range of the file each
CLIENTS = 50
SLUG = "launch-day"
MAX_SECONDS = 420.0  # the requests stop here whatever is left; what is missing is reported
AFTER_S = 60.0  # what the scenario needs after the requests: stop, flush, count


def segments(size: int, n: int = SEGMENTS) -> list[tuple[int, int]]:
    """The `n` equal ranges (first, last byte) of a file, the last one taking the remainder."""
    step = size // n
    return [(i * step, (i + 1) * step - 1 if i < n - 1 else size - 1) for i in range(n)]


def launch_requests(tokens: list[str], shards: list[dict], seed: int = 2026) -> list[load.Request]:
    """Every grantee's 16 ranges of every shard, in one random order over grantees."""
    requests = [
        load.Request(f"/d/{token}/{shard['path']}", {"Range": f"bytes={first}-{last}"})
        for token in tokens
        for shard in shards
        for first, last in segments(shard["size"])
    ]
    random.Random(seed).shuffle(requests)
    return requests


def _publish_release(run, env: dict[str, str]) -> None:
    stack = run.stack
    source = stack.sample_release(
        stack.root / "launch-release", shards=SHARDS, shard_mb=SHARD_MB, env=env, seed=11
    )
    s3_publish(stack, env, source, SLUG)


def launch_scenario(run) -> dict:
    stack = run.stack
    grantees = run.args.launch_grantees
    env = s3_start(stack)
    try:
        _publish_release(run, env)
        t0 = time.monotonic()
        # Approval mails and first links run in-process, as in setup: queued, they would
        # wait in the private Redis for the worker a fault scenario starts later.
        issued = stack.internal(
            "launch_links",
            env={**env, "CELERY_TASK_ALWAYS_EAGER": "1"},
            prefix="launch",
            count=grantees,
            slug=SLUG,
            budget_copies=1,
            timeout=600,
        )
        grants_s = time.monotonic() - t0
        shards = issued["shards"]
        if len(shards) != SHARDS:
            raise RuntimeError(f"the launch release has {len(shards)} shards, not {SHARDS}")
        requests = launch_requests(issued["tokens"], shards)
        bound = max(30.0, min(MAX_SECONDS, run.left() - AFTER_S))
        server = stack.start_gunicorn(env)
        try:
            served = load.run_once(
                server.port, requests, seconds=bound, clients=CLIENTS, expect=frozenset({302})
            )
        finally:
            server.stop()  # workers insert their journalled events as they exit
        flushed = stack.manage("flush_download_events", env=env)
        if flushed.returncode:
            raise RuntimeError(f"flush_download_events failed: {flushed.stderr[-800:]}")
        books = stack.internal(
            "launch_accounting", env=env, slug=SLUG, paths=[s["path"] for s in shards]
        )
    finally:
        stack.stop_moto()

    planned = len(requests)
    ok_302 = served["statuses"].get("302", 0)
    usage, events = books["usage"], books["events"]
    pairs = grantees * SHARDS
    exact = usage["pairs"] == pairs and usage["exact"] == pairs
    all_events = events["rows"] == planned and events["redirected"] == planned
    met = served["complete"] and served["errors"] == 0 and exact and all_events
    return {
        "status": "ok" if met else "target missed",
        "label": "authorisations, S3 redirect mode: 302 to a presigned URL, no bytes through "
        "the portal",
        "grantees": grantees,
        "shards": SHARDS,
        "shard_mib": SHARD_MB,
        "ranges_per_shard": SEGMENTS,
        "clients": CLIENTS,
        "authorisations_planned": planned,
        "authorisations_302": ok_302,
        "errors": served["errors"],
        "statuses": served["statuses"],
        "all_answered": served["complete"],
        "seconds_until_all_answered": served["seconds"] if served["complete"] else None,
        "seconds": served["seconds"],
        "bound_s": round(bound),
        "authorisations_per_s": round(ok_302 / served["seconds"], 1) if served["seconds"] else 0,
        "p50_ms": served["p50_ms"],
        "p95_ms": served["p95_ms"],
        "p99_ms": served["p99_ms"],
        "max_ms": served["max_ms"],
        "client": served["client"],
        "grants_s": round(grants_s, 1),
        "link_shard_pairs": pairs,
        "charged_exactly_shard_size": usage["exact"],
        "charged_over": usage["over"],
        "charged_under": usage["under"],
        "bytes_charged": usage["bytes_charged"],
        "bytes_expected": usage["bytes_expected"],
        "bytes_forgiven": usage["bytes_forgiven"],
        "download_events": events["rows"],
        "download_events_redirected": events["redirected"],
        "gunicorn": "gthread, 2 workers x 8 threads",
        "database": "private PostgreSQL 15, DATABASE_CONN_MAX_AGE=60 (portal default)",
    }
