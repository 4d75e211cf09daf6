"""Summary line and the figures written into docs/benchmarks.md (## Load) and docs/reliability.md.

The `<!-- prove:run -->` block of docs/benchmarks.md holds one section per scenario
(`<!-- prove:load -->`, `<!-- prove:launch -->`), each dated; a run that skips one keeps
the previous run's section as it was.
"""

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


def _ms(m: dict) -> str:
    return f"{m['p50_ms']} | {m['p95_ms']} | {m['p99_ms']}"


def _mode_table(mode: dict, clients: int) -> list[str]:
    trivial = mode["trivial"]
    rows = [(f"trivial Django view (`{mode['trivial_path']}`)", trivial)]
    if "file_with_shards" in mode:
        rows += [
            ("file endpoint: params.json + 64 KiB Range GETs, quiet", mode["file"]),
            ("same, 20 x 64 MiB shard downloads alongside", mode["file_with_shards"]),
            ("landing page (extra line, not in the target)", mode["landing"]),
        ]
    else:
        rows.append(("file endpoint: params.json + 64 KiB Range GETs", mode["file"]))
    lines = [
        f"**{mode['label']}**",
        "",
        f"| workload ({clients} clients) | s | requests | req/s | errors | p50 ms | p95 ms "
        "| p99 ms | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in rows:
        ratio = m["rps"] / trivial["rps"] if trivial["rps"] and m is not trivial else None
        lines.append(
            f"| {name} | {m['seconds']} | {m['requests']} | {m['rps']} | {m['errors']} | "
            f"{_ms(m)} | {'' if ratio is None else f'{ratio:.1%}'} |"
        )
    verdict = "met" if mode["met"] else "not met"
    lines += [
        "",
        f"Ratio to the trivial view: **{mode['ratio']:.1%}** (target ≥ 40 %, 0 errors: {verdict})",
    ]
    shards = mode.get("shard_downloads")
    if shards:
        lines[-1] += (
            f"; shard downloads alongside: {shards['complete']}/{shards['shards']} complete "
            f"({shards['shard_mib']} MiB each), median {shards['median_mib_s']} MiB/s"
        )
    return lines


def _load_section(load: dict, when: str) -> str:
    head = f"#### File endpoint vs the trivial view, three serving modes ({when})"
    if "modes" not in load:
        return f"{head}\n\n{load.get('status')} {load.get('error', '')}\n"
    lines = [head, ""]
    for mode in load["modes"].values():
        lines += [*_mode_table(mode, load["clients"]), ""]
    client = next(iter(load["modes"].values()))["trivial"]["client"]
    lines.append(
        f"Client: {client}, the trivial view measured in each mode's own gunicorn run; server: "
        f"{load['gunicorn']}; {load['links']} links; database: {load['database']}."
    )
    return "\n".join(lines) + "\n"


def _launch_section(launch: dict, when: str) -> str:
    head = f"#### Launch day: {launch.get('label', 'authorisations')} ({when})"
    if "authorisations_planned" not in launch:
        return f"{head}\n\n{launch.get('status')} {launch.get('error', '')}\n"
    if launch["all_answered"]:
        served = f"all {launch['authorisations_planned']} answered in **{launch['seconds']} s**"
        if launch["errors"]:
            served += f", **{launch['errors']} of them not 302**"
    else:
        served = f"**not all answered**: stopped at the {launch['bound_s']} s bound"
    books = "exact" if launch["status"] == "ok" else "see the counts"
    rows = [
        (
            "grantees x shards x ranges",
            f"{launch['grantees']} x {launch['shards']} x "
            f"{launch['ranges_per_shard']} = {launch['authorisations_planned']}",
        ),
        (
            "answered 302 / errors (anything else)",
            f"{launch['authorisations_302']} / {launch['errors']}",
        ),
        ("authorisations per second", f"**{launch['authorisations_per_s']}**"),
        ("time until all were answered", served),
        (
            "latency p50 / p95 / p99 ms",
            f"{launch['p50_ms']} / {launch['p95_ms']} / {launch['p99_ms']}",
        ),
        (
            "(link, shard) charged exactly the shard size",
            f"{launch['charged_exactly_shard_size']}"
            f" / {launch['link_shard_pairs']} (over: {launch['charged_over']}, under: "
            f"{launch['charged_under']})",
        ),
        (
            "DownloadEvent rows after the journal flush",
            f"{launch['download_events']} ({launch['download_events_redirected']} redirected)",
        ),
    ]
    lines = [head, "", "| measure | figure |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += [
        "",
        f"Accounting: {books}. {launch['clients']} keep-alive clients ({launch['client']}), "
        f"one random order over grantees, one link per grantee with a budget of one copy, "
        f"{launch['shard_mib']} MiB shards in the private moto; server: {launch['gunicorn']}; "
        f"database: {launch['database']}; {launch['grants_s']} s to create the grants "
        "(submit, approve, link_issue).",
    ]
    return "\n".join(lines) + "\n"


SECTIONS = {"load": _load_section, "launch": _launch_section}


def _section(name: str, body: str) -> str:
    return f"<!-- prove:{name} -->\n{body}<!-- /prove:{name} -->"


def _previous_section(text: str, name: str) -> str | None:
    """A section as the last run that had it wrote it (kept when this run skipped it)."""
    found = re.search(rf"<!-- prove:{name} -->\n.*?<!-- /prove:{name} -->", text, re.S)
    return found.group(0) if found else None


def _benchmarks_body(text: str, by: dict[str, dict], when: str) -> str:
    parts = []
    for name, render in SECTIONS.items():
        if name in by:
            parts.append(_section(name, render(by[name], when)))
        elif (kept := _previous_section(text, name)) is not None:
            parts.append(kept)
    return "\n\n".join(parts) + "\n"


def _block(summary: dict, body: str) -> str:
    return f"{RUN_START}\n### Run {summary['date']}, {summary['machine']}\n\n{body}\n{RUN_END}"


def _replace_block(text: str, block: str) -> str:
    pattern = re.compile(re.escape(RUN_START) + r".*?" + re.escape(RUN_END), re.S)
    if pattern.search(text):
        return pattern.sub(lambda m: block, text)
    return text.rstrip() + "\n\n" + block + "\n"


LOAD_INTRO = """## Load

`make prove` (`.venv/bin/python -m prove`, ~20 min, bounded) starts a private PostgreSQL,
Redis and moto on free loopback ports and the portal under gunicorn (gthread, 2 workers x
8 threads, DEBUG off). `--only load` measures the file endpoint next to a trivial Django
view in three serving modes; `--only launch` replays launch day (64,000 authorisations).
The block below is rewritten by each run; the JSON lines of the run are printed by the
command.
"""


def write_docs(summary: dict, results: list[dict]) -> None:
    ran = {k: v for k, v in _by_name(results).items() if k in SECTIONS}
    by = {k: v for k, v in ran.items() if not str(v.get("status", "")).startswith("not run")}
    if by and BENCHMARKS.exists():
        text = BENCHMARKS.read_text()
        if "\n## Load\n" not in text:
            text = text.rstrip() + "\n\n" + LOAD_INTRO
        body = _benchmarks_body(text, by, summary["date"])
        text = _replace_block(text, _block(summary, body))
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
