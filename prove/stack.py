"""Private, throw-away services for `make prove`: PostgreSQL, Redis, moto (S3), gunicorn, Celery.

Nothing here touches the machine's shared PostgreSQL (5432) or Redis (6379): every
service is started by us on a free loopback port, under a temporary directory, and
stopped by `Stack.close()` (also on SIGTERM/SIGINT and at interpreter exit).
Only processes this module started are ever signalled, by their own pid or process group.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class StackError(RuntimeError):
    """A private service could not be started: the scenario reports `not run`."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout):
        return True
    return False


def wait_for(predicate, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def http_get(
    port: int, path: str, headers: dict | None = None, timeout: float = 10
) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def http_request(
    port: int, method: str, path: str, *, body: dict | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group of a child we started in its own session."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        _kill_group(self.proc, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


@dataclass
class Stack:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="prove-")))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(45)[:60])
    services: list[Service] = field(default_factory=list)
    pg_dir: Path | None = None
    pg_port: int = 0
    redis: Service | None = None
    moto: Service | None = None
    _closed: bool = False

    def __post_init__(self) -> None:
        (self.root / "var").mkdir(parents=True, exist_ok=True)
        (self.root / "storage").mkdir(exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.close()
        raise SystemExit(128 + signum)

    # ------------------------------------------------------------------ processes

    def spawn(self, name: str, command: list[str], *, env: dict | None = None, port: int = 0):
        log = self.root / "logs" / f"{name}-{len(self.services)}.log"
        proc = subprocess.Popen(  # noqa: S603 - our own binaries and arguments
            command,
            cwd=REPO,
            env=env or os.environ.copy(),
            stdin=subprocess.DEVNULL,
            stdout=open(log, "ab"),  # noqa: SIM115 - lives with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we signal only what we started
        )
        service = Service(name=name, proc=proc, port=port, log=log)
        self.services.append(service)
        return service

    # ------------------------------------------------------------------ PostgreSQL

    def start_postgres(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise StackError(f"no PostgreSQL binaries under {PG_BIN}")
        if self.pg_dir is None:
            base = Path(tempfile.mkdtemp(prefix="prove-pg-"))
            shutil.chown(base, "postgres", "postgres")
            self.pg_dir = base / "data"
            self.pg_port = free_port()
            self._pg(
                "initdb",
                "-D",
                str(self.pg_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            )
        self._pg(
            "pg_ctl",
            "-D",
            str(self.pg_dir),
            "-o",
            f"-p {self.pg_port} -k {self.pg_dir.parent} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200",
            "-l",
            str(self.pg_dir.parent / "postgres.log"),
            "-w",
            "-t",
            "30",
            "start",
        )
        if not wait_for(lambda: port_open(self.pg_port), 20):
            raise StackError("private PostgreSQL did not open its port")

    def create_database(self, name: str = "portal") -> str:
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", name)
        return f"postgres://postgres@127.0.0.1:{self.pg_port}/{name}"

    def stop_postgres(self) -> None:
        if self.pg_dir is not None and (self.pg_dir / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self.pg_dir), "-m", "fast", "-w", "-t", "30", "stop")

    def _pg(self, tool: str, *args: str) -> str:
        result = subprocess.run(  # noqa: S603
            [
                shutil.which("runuser") or "/usr/sbin/runuser",
                "-u",
                "postgres",
                "--",
                str(PG_BIN / tool),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            cwd="/tmp",  # noqa: S108 - postgres cannot read our cwd
        )
        if result.returncode:
            raise StackError(f"{tool} failed: {result.stderr.strip()[-500:]}")
        return result.stdout

    # ------------------------------------------------------------------ Redis

    def start_redis(self, port: int | None = None) -> Service:
        port = port or (self.redis.port if self.redis else free_port())
        self.redis = self.spawn(
            "redis",
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            port=port,
        )
        if not wait_for(lambda: port_open(port), 15):
            raise StackError(f"private redis did not start: {self.redis.tail()}")
        return self.redis

    def stop_redis(self) -> None:
        if self.redis and self.redis.alive():
            self.redis.stop(signal.SIGKILL)

    def redis_flush(self) -> None:
        import redis

        redis.Redis(port=self.redis.port, socket_timeout=5).flushall()

    # ------------------------------------------------------------------ moto (S3)

    def start_moto(self, port: int | None = None) -> Service:
        port = port or (self.moto.port if self.moto else free_port())
        self.moto = self.spawn(
            "moto",
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            port=port,
        )
        if not wait_for(lambda: port_open(port), 30):
            raise StackError(f"private moto server did not start: {self.moto.tail()}")
        return self.moto

    def stop_moto(self) -> None:
        if self.moto and self.moto.alive():
            self.moto.stop(signal.SIGKILL)

    # ------------------------------------------------------------------ the portal

    def env(self, **overrides: str) -> dict[str, str]:
        """Production settings (DEBUG off) on loopback, every service private."""
        prefixes = ("DJANGO_", "PORTAL_", "WEIGHTS_", "DATABASE_", "REDIS_", "CELERY_", "EMAIL_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env.update(
            DJANGO_SETTINGS_MODULE="prove.settings",
            DEBUG="0",
            SECRET_KEY=self.secret_key,
            ALLOWED_HOSTS="127.0.0.1,localhost",
            SECURE_SSL_REDIRECT="0",
            PORTAL_VAR_DIR=str(self.root / "var"),
            WEIGHTS_STORAGE="local",
            WEIGHTS_LOCAL_ROOT=str(self.root / "storage"),
            LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        if self.pg_port:
            env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{self.pg_port}/portal"
        if self.redis:
            env["REDIS_URL"] = f"redis://127.0.0.1:{self.redis.port}/0"
        env.update(overrides)
        return env

    def manage(self, *args: str, env: dict | None = None, timeout: float = 300):
        return subprocess.run(  # noqa: S603
            [sys.executable, str(REPO / "manage.py"), *args],
            cwd=REPO,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def sample_release(
        self, directory: Path, *, shards: int, shard_mb: int, env: dict, seed: int | None = None
    ) -> Path:
        """`manage.py generate_sample_release` into `directory` (Meta's layout, 7B)."""
        args = ["--shards", str(shards), "--shard-mb", str(shard_mb)]
        if seed is not None:
            args += ["--seed", str(seed)]
        result = self.manage("generate_sample_release", str(directory), *args, env=env)
        if result.returncode:
            raise StackError(f"generate_sample_release failed: {result.stderr[-800:]}")
        return directory

    def internal(self, command: str, *, env: dict | None = None, timeout: float = 300, **kw):
        """Run prove.internal COMMAND inside Django; returns its last JSON line."""
        result = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "prove.internal", command, json.dumps(kw)],
            cwd=REPO,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode:
            raise StackError(f"internal {command} failed: {result.stderr.strip()[-1500:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def start_gunicorn(self, env: dict, *, workers: int = 2, threads: int = 8) -> Service:
        port = free_port()
        server = self.spawn(
            "gunicorn",
            [
                str(BIN / "gunicorn"),
                "portal.wsgi:application",
                "--worker-class",
                "gthread",
                "--threads",
                str(threads),
                "-w",
                str(workers),
                "-b",
                f"127.0.0.1:{port}",
                "--timeout",
                "60",
                "--graceful-timeout",
                "5",
            ],
            env=env,
            port=port,
        )

        def up() -> bool:
            if not server.alive():
                raise StackError(f"gunicorn exited: {server.tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                return http_get(port, "/_prove/trivial/", timeout=2)[0] == 200
            return False

        if not wait_for(up, 60):
            raise StackError(f"gunicorn did not answer: {server.tail()}")
        return server

    def start_worker(self, env: dict, *, name: str = "prove", concurrency: int = 2) -> Service:
        worker = self.spawn(
            "celery",
            [
                str(BIN / "celery"),
                "-A",
                "portal",
                "worker",
                "-Q",
                "default,mail",
                "-n",
                f"{name}@%h",
                "--concurrency",
                str(concurrency),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "info",
            ],
            env=env,
        )
        if not wait_for(lambda: "ready." in worker.tail(200) or not worker.alive(), 90):
            raise StackError(f"celery worker did not become ready: {worker.tail()}")
        if not worker.alive():
            raise StackError(f"celery worker exited: {worker.tail()}")
        return worker

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop(signal.SIGTERM, timeout=10)
        with contextlib.suppress(Exception):
            self.stop_postgres()
        if self.pg_dir is not None:
            shutil.rmtree(self.pg_dir.parent, ignore_errors=True)
        if os.environ.get("PROVE_KEEP_TMP") != "1":
            shutil.rmtree(self.root, ignore_errors=True)
