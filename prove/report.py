"""Summary line and the figures written into docs/benchmarks.md (## Load) and docs/reliability.md."""

from __future__ import annotations

import json
import re

from prove.stack import REPO

BENCHMARKS = REPO / "docs" / "benchmarks.md"
RELIABILITY = REPO / "docs" / "reliability.md"
RUN_START = "<!-- prove:run -->"
RUN_END = "<!-- /prove:run -->"


def summarise(results: list[dict], *, when: str, machine: str) -> dict:
    statuses = {r["scenario"]: r.get("status", "?") for r in results}
    return {
        "summary": "prove",
        "date": when,
        "machine": machine,
        "scenarios": statuses,
        "not_run": [k for k, v in statuses.items() if str(v).startswith("not run")],
        "failed": [
            k for k, v in statuses.items() if v not in ("ok",) and not str(v).startswith("not run")
        ],
        "all_ok": all(v == "ok" for v in statuses.values()),
    }


def _by_name(results: list[dict]) -> dict[str, dict]:
    return {r["scenario"]: r for r in results}


def _load_table(load: dict) -> str:
    if "trivial" not in load:
        return f"Load: {load.get('status')} {load.get('error', '')}\n"
    rows = [
        ("trivial Django view (`" + load["trivial_path"] + "`)", load["trivial"]),
        ("landing + small file + 64 KiB Range GETs, quiet", load["portal_mix_quiet"]),
        ("same, 20 x 64 MiB shard downloads alongside", load["portal_mix_with_shards"]),
    ]
    if load.get("portal_mix_persistent_db"):
        rows.append(("same mix, quiet, DATABASE_CONN_MAX_AGE=60", load["portal_mix_persistent_db"]))
    lines = [
        "| workload (50 clients) | s | requests | req/s | errors | p50 ms | p95 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['seconds']} | {m['requests']} | {m['rps']} | {m['errors']} | "
            f"{m['p50_ms']} | {m['p95_ms']} | {m['p99_ms']} |"
        )
    shards = load["shard_downloads"]
    lines += [
        "",
        f"- ratio to the trivial view: **{load['ratio_with_shards']:.1%}** with shard downloads, "
        f"{load['ratio_quiet']:.1%} quiet (target ≥ 40 %: "
        f"{'met' if load['ratio_with_shards'] >= 0.4 else 'not met'})",
        f"- shard downloads alongside: {shards['complete']}/{shards['shards']} complete "
        f"({shards['shard_mib']} MiB each), median {shards['median_mib_s']} MiB/s",
        f"- client: {load['trivial']['client']}; server: {load['gunicorn']}; database: private "
        "PostgreSQL 15 (defaults), connection per request unless stated",
    ]
    return "\n".join(lines) + "\n"


def _block(summary: dict, body: str) -> str:
    return f"{RUN_START}\n### Run {summary['date']}, {summary['machine']}\n\n{body}\n{RUN_END}"


def _replace_block(text: str, block: str) -> str:
    pattern = re.compile(re.escape(RUN_START) + r".*?" + re.escape(RUN_END), re.S)
    if pattern.search(text):
        return pattern.sub(lambda m: block, text)
    return text.rstrip() + "\n\n" + block + "\n"


LOAD_INTRO = """## Load

`make prove` (`.venv/bin/python -m prove`, ~10 min, bounded) starts a private PostgreSQL,
Redis and moto on free loopback ports, the portal under gunicorn (gthread, 2 workers x 8
threads, DEBUG off), and drives the download landing page and the file endpoint (small
file GETs and 64 KiB Range GETs, 10 links) with 50 concurrent keep-alive clients for 60 s,
next to a trivial Django view measured with the same client in the same run. Twenty full
64 MiB shard downloads run alongside (one every ~3 s, at most 4 at once). The block below
is rewritten by each run; the JSON lines of the run are printed by the command.
"""


def write_docs(summary: dict, results: list[dict]) -> None:
    by = _by_name(results)
    load = by.get("load")
    if load is not None and BENCHMARKS.exists():
        text = BENCHMARKS.read_text()
        if "\n## Load\n" not in text:
            text = text.rstrip() + "\n\n" + LOAD_INTRO
        text = _replace_block(text, _block(summary, _load_table(load)))
        BENCHMARKS.write_text(text)
    if RELIABILITY.exists():
        text = RELIABILITY.read_text()
        body = "\n".join(
            f"- **{r['scenario']}**: {r.get('status')} ({r.get('elapsed_s')} s)" for r in results
        )
        details = "\n".join(
            json.dumps(
                {k: v for k, v in r.items() if k != "trace"}, default=str, ensure_ascii=False
            )
            for r in results
            if r["scenario"] != "setup"
        )
        body += (
            "\n\n<details><summary>JSON lines of this run</summary>\n\n```json\n"
            + details
            + "\n```\n\n</details>\n"
        )
        RELIABILITY.write_text(_replace_block(text, _block(summary, body)))
