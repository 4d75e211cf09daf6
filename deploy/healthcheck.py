"""Container health checks that need nothing but Python (slim images have no curl).

    python deploy/healthcheck.py http http://127.0.0.1:8000/healthz
    python deploy/healthcheck.py fresh '/tmp/celerybeat-schedule*' 900

`http` sends the Host the portal accepts (the first of ALLOWED_HOSTS) and
X-Forwarded-Proto: https, as nginx would, so neither ALLOWED_HOSTS nor the HTTPS
redirect turns a healthy answer into a 400 or a 301; any status but 2xx fails.
`fresh` passes while a file matching the pattern changed in the last N seconds
(Celery beat rewrites its schedule file as it sends the periodic tasks).
"""

from __future__ import annotations

import glob
import http.client
import os
import sys
import time
from urllib.parse import urlsplit


def portal_host() -> str:
    first = os.environ.get("ALLOWED_HOSTS", "localhost").split(",")[0].strip()
    host = first.lstrip(".").replace("*", "")
    return host or "localhost"


def check_http(url: str, timeout: float = 4.0) -> int:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        connection.request(
            "GET",
            parts.path or "/",
            headers={"Host": portal_host(), "X-Forwarded-Proto": "https"},
        )
        status = connection.getresponse().status
    finally:
        connection.close()
    if not 200 <= status < 300:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


def check_fresh(pattern: str, max_age: float) -> int:
    mtimes = [os.path.getmtime(path) for path in glob.glob(pattern)]
    if not mtimes:
        print(f"nothing matches {pattern}", file=sys.stderr)
        return 1
    age = time.time() - max(mtimes)
    if age > max_age:
        print(f"{pattern} last changed {age:.0f}s ago (limit {max_age:.0f}s)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "http":
            return check_http(argv[1])
        if len(argv) == 3 and argv[0] == "fresh":
            return check_fresh(argv[1], float(argv[2]))
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
