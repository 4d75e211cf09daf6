"""Real servers for tests: a free port, the test database for a subprocess, processes
started in a session of their own and stopped with all their children, a wait, and nginx
with the deployed conf in front of a gunicorn."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
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
NGINX_CONF = ROOT / "deploy" / "nginx" / "default.conf"
# The key of every portal subprocess: a test that signs something the server must accept
# (an API token's password stamp) sets its own settings.SECRET_KEY to it.
SERVER_SECRET_KEY = "test-server-secret-key-" + "k" * 50


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


def gunicorn_env(tmp: Path, port: int, storage: Mapping[str, str], threads: int) -> dict[str, str]:
    """The portal as deployed (production settings, DEBUG off) on the test database."""
    from django.conf import settings

    (tmp / "var").mkdir(exist_ok=True)
    return {
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DEBUG": "0",
        "SECRET_KEY": SERVER_SECRET_KEY,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        # Plain HTTP on loopback: clients cannot add the X-Forwarded-Proto a TLS proxy would.
        "SECURE_SSL_REDIRECT": "0",
        "DATABASE_URL": test_database_url(),
        "DATABASE_CONN_MAX_AGE": "0",
        "REDIS_URL": "",
        "PORTAL_VAR_DIR": str(tmp / "var"),
        "PORTAL_SITE_URL": f"http://127.0.0.1:{port}",
        "WEIGHTS_EVENT_BATCH": "1",  # each download event lands at once
        "WEIGHTS_BUDGET_SLACK_BYTES": str(settings.WEIGHTS_BUDGET_SLACK_BYTES),
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": str(threads),
        "FORWARDED_ALLOW_IPS": "127.0.0.1",  # nginx, and only nginx, names the client
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        **storage,
    }


@contextlib.contextmanager
def portal_gunicorn(
    tmp: Path, storage: Mapping[str, str], *, threads: int = 4
) -> Iterator[tuple[int, Path]]:
    """gunicorn with deploy/gunicorn.conf.py on the test database: (port, log) once it answers."""
    port = free_port()
    log = tmp / "gunicorn.log"
    with started(
        [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py"],
        env=process_env(gunicorn_env(tmp, port, storage, threads)),
        log=log,
    ) as gunicorn:
        wait_for(lambda: healthz_answers(port), "gunicorn", log=log, timeout=60, process=gunicorn)
        yield port, log


def nginx_binary() -> str | None:
    """nginx on PATH, or where Debian installs it (/usr/sbin is not on every PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


@contextlib.contextmanager
def nginx_running(
    nginx: str,
    upstream_port: int,
    tmp: Path,
    weights: Path,
) -> Iterator[int]:
    """deploy/nginx/default.conf, with only addresses and host paths changed, in front of
    the gunicorn on `upstream_port`, on a free loopback port; its logs go under `tmp`.
    Yields nginx's port."""
    port = free_port()
    static = tmp / "static"
    (static / "portal").mkdir(parents=True, exist_ok=True)
    (static / "portal" / "probe.css").write_text("body{}")
    conf = NGINX_CONF.read_text()
    for old, new in (
        ("listen 80 default_server;", f"listen 127.0.0.1:{port} default_server;"),
        ("server web:8000;", f"server 127.0.0.1:{upstream_port};"),
        ("alias /srv/static/;", f"alias {static}/;"),
        ("alias /srv/weights/;", f"alias {weights}/;"),
        ("access_log /dev/stdout portal_json;", f"access_log {tmp}/nginx-access.log portal_json;"),
    ):
        assert conf.count(old) == 1, f"default.conf no longer has {old!r}"
        conf = conf.replace(old, new)
    (tmp / "portal.conf").write_text(conf)
    temp = tmp / "nginx-temp"
    temp.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(
        f"{user}worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log;\n"
        "events { worker_connections 64; }\nhttp {\n  include /etc/nginx/mime.types;\n"
        + "".join(
            f"  {kind}_temp_path {temp}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"  include {tmp}/portal.conf;\n}}\n"
    )
    command = [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")]
    tested = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
    assert tested.returncode == 0, tested.stderr
    log = tmp / "nginx.log"
    with started([*command, "-g", "daemon off;"], env=process_env({}), log=log):
        wait_for(lambda: _answers(port, "/nginx-health"), "nginx", log=log, timeout=10)
        yield port


def healthz_answers(port: int) -> bool:
    """Whether a portal on loopback `port` answers /healthz with 200 (False while it is
    still starting: refused or dropped connections)."""
    return _answers(port, "/healthz")


def _answers(port: int, path: str) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
