"""Hostile input: schemathesis against the portal's OpenAPI schema on the running gunicorn.

Bounded by --max-examples per operation and --max-time for the whole run; a researcher
token (rest_framework.authtoken) authenticates every request. `not_a_server_error` is
the check: any 5xx is reported with the operation and the reproducing request.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from prove.stack import BIN, REPO

MAX_EXAMPLES = 25
MAX_TIME_S = 75


def _run(port: int, token: str, report: Path, label: str) -> dict:
    command = [
        str(BIN / "schemathesis"),
        "run",
        f"http://127.0.0.1:{port}/api/schema/",
        "--checks",
        "not_a_server_error",
        "-H",
        f"Authorization: Token {token}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_TIME_S),
        "--workers",
        "2",
        "--seed",
        "1",
        "--request-timeout",
        "20",
        "--continue-on-failure",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
        "--no-color",
    ]
    result = subprocess.run(  # noqa: S603
        command, cwd=REPO, capture_output=True, text=True, timeout=MAX_TIME_S + 120, check=False
    )
    out = result.stdout
    failures = _server_errors(out)
    summary = [ln.strip() for ln in out.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return {
        "as": label,
        "exit_code": result.returncode,
        "summary": summary[-3:],
        "server_errors": failures[:10],
        "output_tail": out[-1200:] if result.returncode not in (0, 1) or not summary else "",
    }


def _server_errors(out: str) -> list[str]:
    """Operations schemathesis reported under a failure heading, with the status line."""
    found = []
    current = ""
    for line in out.splitlines():
        heading = re.match(r"_+ (GET|POST|PUT|PATCH|DELETE) (\S+) _+", line.strip())
        if heading:
            current = f"{heading.group(1)} {heading.group(2)}"
        status = re.search(r"\[(5\d\d)\]", line)
        if status and current:
            found.append(f"{current} -> {status.group(1)}")
        if line.strip().startswith("curl ") and current:
            reproduce = re.sub(r"Token [0-9a-f]+", "Token <token>", line.strip())
            found.append(f"{current} reproduce: {reproduce[:600]}")
    return sorted(set(found))


def schemathesis_run(run) -> dict:
    stack = run.stack
    server = stack.start_gunicorn(stack.env(PORTAL_SUBMIT_RATE="1000/h"))
    try:
        researcher = run.data["links"][3]["api_token"]
        reviewer = stack.internal("reviewer_token")["token"]
        runs = [
            _run(server.port, researcher, stack.root / "st-researcher.ndjson", "researcher"),
            _run(server.port, reviewer, stack.root / "st-reviewer.ndjson", "reviewer"),
        ]
    finally:
        server.stop()
    errors = sorted({e for r in runs for e in r["server_errors"]})
    clean = all(r["exit_code"] == 0 for r in runs) and not errors
    return {
        "status": "ok" if clean else "failed",
        "max_examples_per_operation": MAX_EXAMPLES,
        "server_errors": errors,
        "runs": runs,
        "note": json.dumps({"checks": "not_a_server_error"}),
    }
