"""Real servers for tests: a free port, the test database for a subprocess, processes
started in a session of their own and stopped with all their children, and a wait."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STOP_TIMEOUT_S = 20  # from SIGTERM to SIGKILL: gunicorn and celery shut down gracefully
LOG_TAIL = 3000


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_url() -> str:
    """The current test database, as DATABASE_URL for a subprocess (SQLite file or PostgreSQL)."""
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    auth = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        auth += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


# Imported into test modules by name: pytest must not collect it as a test there.
test_database_url.__test__ = False


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """Only `env` (nothing of this test run's settings), with HOME, LANG, TMPDIR and the
    venv on PATH."""
    base = {key: os.environ[key] for key in ("HOME", "LANG", "TMPDIR") if key in os.environ}
    return {**base, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", **env}


@contextlib.contextmanager
def started(
    args: list[str], *, env: Mapping[str, str], log: Path, cwd: Path = ROOT
) -> Iterator[subprocess.Popen]:
    """`args` in a session of its own, output to `log`; on exit its process group gets
    SIGTERM, then SIGKILL if it has not ended within STOP_TIMEOUT_S."""
    with log.open("w") as out:
        process = subprocess.Popen(
            args,
            cwd=cwd,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_for(
    check: Callable[[], object],
    what: str,
    *,
    log: Path | None = None,
    timeout: float = 30,
    process: subprocess.Popen | None = None,
) -> None:
    """Poll `check` until it is true; else fail with the tail of `log`, after `timeout`
    seconds or as soon as `process` has exited. A check raising OSError (a refused
    connection) is not true yet."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if check():
                return
        if process is not None and process.poll() is not None:
            reason = f"exited with status {process.returncode}"
            break
        if time.monotonic() >= deadline:
            reason = f"did not come up in {timeout:.0f} s"
            break
        time.sleep(0.3)
    tail = log.read_text()[-LOG_TAIL:] if log is not None and log.exists() else ""
    pytest.fail(f"{what} {reason}\n{tail}")
