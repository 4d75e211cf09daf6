"""Hostile input against the running gunicorn: schemathesis, then hand-made requests.

`schemathesis_run`: schemathesis against the portal's OpenAPI schema.

Bounded by --max-examples per operation and --max-time for the whole run; a researcher
token (django-rest-knox, `Authorization: Bearer`) authenticates every request. `not_a_server_error` is
the check: any 5xx is reported with the operation and the reproducing request.

`requests_run`: the requests a schema-driven fuzzer does not make, each with the exact
answer expected: 100,000-deep JSON, invisible and control characters in a name, a POST
without its trailing slash and unknown API paths and methods, HEAD and 304 framing on a
keep-alive connection, POST to a download link. Each case reports what it got.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from prove.internal import APPLICATION_FIELDS
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
    tool_errors = _tool_errors(out)
    return {
        "as": label,
        "exit_code": result.returncode,
        # schemathesis's own runtime errors (e.g. a crash in its coverage phase): no request
        # failed a check, so they say nothing about the portal; reported, not counted.
        "tool_errors": tool_errors,
        "checks_failed": result.returncode != 0 and not (tool_errors and _all_passed(out)),
        "summary": summary[-3:],
        "server_errors": failures[:10],
        # A failed run says why: a 5xx is listed above, anything else (a schema error, a
        # network error) is only in schemathesis's own output.
        "output_tail": out[-3000:] if result.returncode != 0 and not failures else "",
    }


def _tool_errors(out: str) -> list[str]:
    """The 'Errors:' block of schemathesis's summary, and the message lines above it."""
    kinds = re.findall(r"^\s*\S+ (Runtime Error|Network Error|Schema Error)[^\n]*$", out, re.M)
    messages = re.findall(r"^(ST [^\n]+|[A-Za-z]+Error: [^\n]+)$", out, re.M)
    return sorted(set(kinds)) + messages[:3]


def _all_passed(out: str) -> bool:
    """Every generated test case passed its checks."""
    match = re.search(r"(\d+) generated, (\d+) passed", out)
    return bool(match) and match[1] == match[2] and " failed" not in match[0]


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
    # Limits high enough that the fuzzer reaches the logic behind them.
    server = stack.start_gunicorn(
        stack.env(PORTAL_SUBMIT_RATE="1000/h", PORTAL_REVIEW_API_RATE="100000/hour")
    )
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
    clean = not any(r["checks_failed"] for r in runs) and not errors
    return {
        "status": "ok" if clean else "failed",
        "max_examples_per_operation": MAX_EXAMPLES,
        "server_errors": errors,
        "runs": runs,
        "note": json.dumps({"checks": "not_a_server_error"}),
    }


# --- hand-made hostile requests ----------------------------------------------------------

DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
BAD_TOKEN = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
INVISIBLE_NAMES = {
    "right-to-left override": "Ada \u202eevorP",
    "zero-width space": "Ada\u200bProver",
    "carriage return": "Ada\r\nBcc: all@example.org",
}
DRAFT = {k: v for k, v in APPLICATION_FIELDS.items() if k != "full_name"}


def _exchange(
    port: int, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _raw(port: int, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """What the server puts on the wire for one request (Connection: close), split up."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *rest = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest)}
    return int(status_line.split()[1]), fields, body


def _json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        return {"not_json": body[:200].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"json": value}


def _count(port: int, auth: dict) -> int:
    _, _, body = _exchange(port, "GET", "/api/applications/", headers=auth)
    data = _json(body)
    return data.get("count", len(data.get("results", data.get("json", []))))


def _deep_json(port: int, auth: dict) -> tuple[bool, dict]:
    json_type = {"Content-Type": "application/json"}
    got = {}
    for who, headers in (("researcher", {**auth, **json_type}), ("anonymous", json_type)):
        status, _, body = _exchange(
            port, "POST", "/api/applications/", body=DEEP_JSON, headers=headers
        )
        got[who] = [status, str(_json(body).get("detail", ""))[:120]]
    ok = got["researcher"][0] == 400 and "nested too deeply" in got["researcher"][1]
    return ok and got["anonymous"][0] == 401, got


def _control_characters(port: int, auth: dict, slug: str) -> tuple[bool, dict]:
    before = _count(port, auth)
    got, ok = {}, True
    for name, full_name in INVISIBLE_NAMES.items():
        body = json.dumps({**DRAFT, "full_name": full_name, "releases": [slug]}).encode()
        headers = {**auth, "Content-Type": "application/json"}
        status, _, raw = _exchange(port, "POST", "/api/applications/", body=body, headers=headers)
        message = _json(raw).get("errors", {}).get("full_name")
        got[name] = [status, message]
        ok = ok and status == 400 and bool(message)
    after = _count(port, auth)
    got["applications_before_after"] = [before, after]
    return ok and before == after, got


def _slashes_and_methods(port: int, auth: dict) -> tuple[bool, dict]:
    json_type = {**auth, "Content-Type": "application/json"}
    checks = {  # name: method, path, status, a piece of the detail
        "POST /api/applications": ("POST", "/api/applications", 404, "/api/applications/"),
        "GET /api/nowhere/": ("GET", "/api/nowhere/", 404, "/api/docs/"),
        "PUT /api/schema/": ("PUT", "/api/schema/", 405, 'Method "PUT" not allowed.'),
        "DELETE /api/releases/": ("DELETE", "/api/releases/", 405, 'Method "DELETE"'),
    }
    got, ok = {}, True
    for name, (method, path, expected, needle) in checks.items():
        status, headers, body = _exchange(port, method, path, body=b"{}", headers=json_type)
        detail = str(_json(body).get("detail", body[:80]))
        got[name] = [status, headers.get("content-type"), headers.get("location"), detail[:140]]
        ok = ok and status == expected and needle in detail and "location" not in headers
        ok = ok and headers.get("content-type") == "application/json"
        if expected == 405:
            ok = ok and bool(headers.get("allow"))
    return ok, got


def _head_and_304(port: int, token: str, shard: str) -> tuple[bool, dict]:
    pages = {  # path: status of its GET
        "/nowhere/": 404,
        "/": 200,
        f"/d/{BAD_TOKEN}/{shard}": 404,
        f"/d/{token}/": 200,
        "/api/nowhere/": 404,
    }
    got, ok = {}, True
    for path in [*pages, f"/d/{token}/{shard}"]:
        status, _, body = _raw(port, "HEAD", path)
        got["HEAD " + path.replace(token, "<token>")] = [status, len(body)]
        ok = ok and status in (200, 404) and body == b""
    # HEAD then GET, page after page, over one keep-alive connection.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for path, expected in pages.items():
            conn.request("HEAD", path)
            conn.getresponse().read()
            conn.request("GET", path)
            response = conn.getresponse()
            ok = ok and response.status == expected and bool(response.read())
        got["keep-alive HEAD then GET"] = "ok" if ok else "broken"
    finally:
        conn.close()
    etag = _raw(port, "HEAD", f"/d/{token}/{shard}")[1].get("etag", "")
    status, headers, body = _raw(port, "GET", f"/d/{token}/{shard}", {"If-None-Match": etag})
    got["304"] = [status, headers.get("content-length"), len(body)]
    ok = ok and status == 304 and "content-length" not in headers and body == b""
    return ok, got


def _post_to_a_link(port: int, token: str, shard: str) -> tuple[bool, list]:
    status, headers, _ = _exchange(port, "POST", f"/d/{token}/{shard}", body=b"x=1")
    return status == 405 and headers.get("allow") == "GET, HEAD", [status, headers.get("allow")]


def _case(name: str, check: Callable[[], tuple[bool, object]]) -> dict:
    try:
        ok, got = check()
    except Exception as exc:  # a case that breaks is a finding, reported with the rest
        ok, got = False, f"{type(exc).__name__}: {exc}"[:400]
    return {"case": name, "ok": ok, "got": got}


def requests_run(run) -> dict:
    stack = run.stack
    server = stack.start_gunicorn(stack.env())
    try:
        link = run.data["links"][4]
        auth = {"Authorization": f"Bearer {link['api_token']}"}
        token, shard, port = link["token"], "7B/consolidated.00.pth", server.port
        cases = [
            _case("deep_json", lambda: _deep_json(port, auth)),
            _case("control_characters", lambda: _control_characters(port, auth, "llama-7b")),
            _case("slashes_and_methods", lambda: _slashes_and_methods(port, auth)),
            _case("head_and_304", lambda: _head_and_304(port, token, shard)),
            _case("post_to_a_link", lambda: _post_to_a_link(port, token, shard)),
        ]
    finally:
        server.stop()
    failed = [c["case"] for c in cases if not c["ok"]]
    return {"status": "ok" if not failed else "failed", "failed": failed, "cases": cases}
