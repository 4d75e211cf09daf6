"""`make prove`: bounded load, fault and hostile-input runs against a private stack.

    .venv/bin/python -m prove [--only load,faults,hostile] [--load-seconds 60] [--no-write]

Starts its own PostgreSQL, Redis and moto (S3) on free loopback ports, the portal under
gunicorn (production settings, DEBUG off) and Celery workers as needed; never touches the
machine's shared PostgreSQL or Redis. Each scenario prints one JSON line; the summary is
the last line. Figures go to docs/benchmarks.md (## Load) and docs/reliability.md unless
--no-write. Every loop is bounded in count and time; the whole run stops by itself
(PROVE_DEADLINE_S, default 600 s, after which the remaining scenarios report `not run`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime

from prove import faults, hostile, load, report
from prove.stack import REPO, Stack, StackError

SLUG = "llama-7b"
SHARDS = 4
SHARD_MB = 64


def machine() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()}-core {platform.machine()} VM, {mem_gib:.0f} GiB, loopback"


def emit(record: dict) -> dict:
    print(json.dumps(record, default=str), flush=True)
    return record


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + float(os.environ.get("PROVE_DEADLINE_S", "600"))
        self.results: list[dict] = []
        self.stack = Stack()
        self.data: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def scenario(self, name: str, fn, *, needs_s: float) -> dict:
        t0 = time.monotonic()
        if self.left() < needs_s:
            record = {"scenario": name, "status": f"not run: {self.left():.0f} s left of the run"}
        else:
            try:
                record = {"scenario": name, **fn(self)}
            except StackError as exc:
                record = {"scenario": name, "status": f"not run: {exc}"[:800]}
            except Exception as exc:  # a scenario that breaks is a finding, not a crash
                record = {
                    "scenario": name,
                    "status": "error",
                    "error": f"{type(exc).__name__}: {exc}"[:800],
                    "trace": traceback.format_exc()[-1500:],
                }
        record["elapsed_s"] = round(time.monotonic() - t0, 1)
        self.results.append(record)
        return emit(record)


def setup(run: Run) -> dict:
    stack = run.stack
    stack.start_postgres()
    stack.create_database()
    stack.start_redis()
    env = stack.env(CELERY_TASK_ALWAYS_EAGER="1")  # setup sends its mail in-process
    for args in (("migrate", "--noinput", "-v", "0"), ("bootstrap_demo",)):
        result = stack.manage(*args, env=env)
        if result.returncode:
            raise StackError(f"manage.py {args[0]} failed: {result.stderr[-800:]}")
    source = stack.root / "release"
    result = stack.manage(
        "generate_sample_release",
        str(source),
        "--shards",
        str(SHARDS),
        "--shard-mb",
        str(SHARD_MB),
        env=env,
    )
    if result.returncode:
        raise StackError(f"generate_sample_release failed: {result.stderr[-800:]}")
    result = stack.manage("publish_release", str(source), "--slug", SLUG, "-v", "0", env=env)
    if result.returncode:
        raise StackError(f"publish_release failed: {result.stderr[-800:]}")
    run.data["release_dir"] = source
    run.data["links"] = stack.internal(
        "granted_links", env=env, prefix="loader", count=10, slug=SLUG, budget_copies=1_000_000
    )["links"]
    return {"status": "ok", "root": str(stack.root)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prove")
    parser.add_argument("--only", default="load,faults,hostile")
    parser.add_argument("--load-seconds", type=int, default=60)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    run = Run(args)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    emit({"prove": "start", "date": when, "machine": machine(), "repo": str(REPO)})
    try:
        ready = run.scenario("setup", setup, needs_s=60)
        ok = ready.get("status") == "ok"
        skip = {"status": f"not run: setup failed ({ready.get('status')})"}
        if "load" in only:
            run.scenario("load", load_scenario if ok else (lambda r: skip), needs_s=140)
        if "faults" in only:
            for name, fn, need in faults.SCENARIOS:
                run.scenario(name, fn if ok else (lambda r: skip), needs_s=need)
        if "hostile" in only:
            run.scenario(
                "hostile_schemathesis",
                hostile.schemathesis_run if ok else (lambda r: skip),
                needs_s=60,
            )
            run.scenario(
                "hostile_requests", hostile.requests_run if ok else (lambda r: skip), needs_s=20
            )
    finally:
        run.stack.close()
    summary = report.summarise(run.results, when=when, machine=machine())
    summary["total_s"] = round(time.monotonic() - run.started, 1)
    if not args.no_write:
        report.write_docs(summary, run.results)
    emit(summary)
    return 0 if summary["all_ok"] else 1


def load_scenario(run: Run) -> dict:
    return load_run(run)


def load_run(run: Run) -> dict:
    stack = run.stack
    seconds = run.args.load_seconds
    server = stack.start_gunicorn(stack.env())
    try:
        port = server.port
        from prove.stack import http_get

        trivial_path = "/healthz" if http_get(port, "/healthz")[0] == 200 else "/_prove/trivial/"
        tokens = [link["token"] for link in run.data["links"]]
        shard_paths = [f"7B/consolidated.{i:02d}.pth" for i in range(SHARDS)]
        shard_size = SHARD_MB * load.MIB
        mix = load.portal_mix(tokens[1:], shard_paths, shard_size)
        # every request kind must succeed once before it is timed
        for request in mix[:3]:
            status = http_get(port, request.path, request.headers)[0]
            if status not in (200, 206):
                raise RuntimeError(f"GET {request.path} answered {status} before the load")
        workdir = stack.root
        short = max(10, seconds // 3)
        trivial = load.measure(
            port, [load.Request(trivial_path)], seconds=short, clients=50, workdir=workdir
        )
        quiet = load.measure(port, mix, seconds=short, clients=50, workdir=workdir)
        downloads = load.ShardDownloads(
            port,
            [f"/d/{tokens[0]}/{p}" for p in shard_paths],
            shard_size,
            count=20,
            seconds=max(1, seconds - 5),
        )
        downloads.start()
        busy = load.measure(port, mix, seconds=seconds, clients=50, workdir=workdir)
        shard_result = downloads.join(timeout=120)
    finally:
        server.stop()
    # the same mix with persistent database connections, to show what connection set-up costs
    persistent = None
    if run.left() > short + 200:
        server = stack.start_gunicorn(stack.env(DATABASE_CONN_MAX_AGE="60"))
        try:
            persistent = load.measure(server.port, mix, seconds=short, clients=50, workdir=workdir)
        finally:
            server.stop()
    ratio = busy["rps"] / trivial["rps"] if trivial["rps"] else 0.0
    ratio_quiet = quiet["rps"] / trivial["rps"] if trivial["rps"] else 0.0
    met = ratio >= 0.40 and busy["errors"] == 0 and shard_result["complete"] == 20
    return {
        "status": "ok" if met else "target missed",
        "trivial_path": trivial_path,
        "trivial": trivial,
        "portal_mix_quiet": quiet,
        "portal_mix_with_shards": busy,
        "shard_downloads": shard_result,
        "portal_mix_persistent_db": persistent,
        "ratio_with_shards": round(ratio, 3),
        "ratio_quiet": round(ratio_quiet, 3),
        "target": ">= 0.40 of trivial rps, 0 errors, 20/20 shards complete",
        "gunicorn": "gthread, 2 workers x 8 threads",
        "db_conn_max_age": os.environ.get("DATABASE_CONN_MAX_AGE", "0 (portal default)"),
    }


if __name__ == "__main__":
    sys.exit(main())
