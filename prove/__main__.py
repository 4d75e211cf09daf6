"""`make prove`: bounded load, launch-day, fault and hostile-input runs against a private stack.

    .venv/bin/python -m prove [--only load,launch,faults,hostile,llamacpp] [--load-seconds 60]
        [--launch-grantees 500] [--no-write]

Starts its own PostgreSQL, Redis and moto (S3) on free loopback ports, the portal under
gunicorn (production settings, DEBUG off) and Celery workers as needed; never touches the
machine's shared PostgreSQL or Redis. Scenarios (--only picks them, comma-separated):

- load: the file endpoint next to the trivial view, 50 clients, in three serving modes
  (local streaming, X-Accel, S3 redirect); prove/load_modes.py;
- launch: launch day, 500 grantees x 8 shards x 16 ranges = 64,000 authorisations in S3
  redirect mode, then the accounting checked (--launch-grantees N for a smaller smoke run);
  prove/launch.py;
- faults: a worker killed, Redis, PostgreSQL and S3 going away; prove/faults.py;
- hostile: schemathesis and hand-written hostile requests; prove/hostile.py;
- llamacpp: the demo's OpenAI backend against llama.cpp's server (llama-cpp-python, built
  once into var/llamacpp-venv, ~10 min) on a GGUF conversion of the demo model; needs no
  PostgreSQL or Redis, so `--only llamacpp` skips the setup; prove/llama_cpp.py.

Each scenario prints one JSON line; the summary is the last line. Unless --no-write, load
and launch figures go to the `<!-- prove:run -->` block of docs/benchmarks.md (a section
not run this time keeps its previous figures) and every status to docs/reliability.md.
Every loop is bounded in count and time; the whole run stops by itself (PROVE_DEADLINE_S,
default 1500 s, after which the remaining scenarios report `not run`).
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

from prove import faults, hostile, launch, llama_cpp, load_modes, report
from prove.stack import REPO, Stack, StackError

SLUG, SHARDS, SHARD_MB = load_modes.SLUG, load_modes.SHARDS, load_modes.SHARD_MB
DEADLINE_S = 1500


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
        self.deadline = self.started + float(os.environ.get("PROVE_DEADLINE_S", DEADLINE_S))
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
    source = stack.sample_release(stack.root / "release", shards=SHARDS, shard_mb=SHARD_MB, env=env)
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
    parser.add_argument("--only", default="load,launch,faults,hostile,llamacpp")
    parser.add_argument("--load-seconds", type=int, default=60)
    parser.add_argument("--launch-grantees", type=int, default=launch.GRANTEES)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    run = Run(args)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    emit({"prove": "start", "date": when, "machine": machine(), "repo": str(REPO)})
    try:
        ok, ready = False, {"status": "not run"}
        if only & {"load", "launch", "faults", "hostile"}:  # llamacpp needs no setup
            ready = run.scenario("setup", setup, needs_s=60)
            ok = ready.get("status") == "ok"
        skip = {"status": f"not run: setup failed ({ready.get('status')})"}
        if "load" in only:
            need = load_modes.needs_s(args.load_seconds)
            run.scenario("load", load_modes.load_scenario if ok else (lambda r: skip), needs_s=need)
        if "launch" in only:
            run.scenario("launch", launch.launch_scenario if ok else (lambda r: skip), needs_s=240)
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
        if "llamacpp" in only:
            run.scenario("llamacpp", llama_cpp.llamacpp_scenario, needs_s=llama_cpp.needs_s())
    finally:
        run.stack.close()
    summary = report.summarise(run.results, when=when, machine=machine())
    summary["total_s"] = round(time.monotonic() - run.started, 1)
    if not args.no_write:
        report.write_docs(summary, run.results)
    emit(summary)
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
