"""Stop reaches the engine whichever web process receives it, in both transports.

The portal scales by running more web processes (gunicorn workers, containers), so
the POST to `.../cancel` often lands on a process other than the one streaming the
generation (embedded mode) or relaying it from a demo worker (services mode). The
two-process tests start real gunicorn processes on the test database: A streams, B
receives the Stop.
"""

# ruff: noqa: F811  (the fixtures imported from test_views and test_worker are parameters here)

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from django.conf import settings
from django.test import override_settings
from django.utils.crypto import get_random_string

from inference_demo import runner, services, transport
from inference_demo.models import DemoRequest
from tests.inference_demo.test_runner import make_request
from tests.inference_demo.test_transport import inprocess  # noqa: F401 (fixture)
from tests.inference_demo.test_views import DEMO, demo_release, grantee  # noqa: F401 (fixtures)
from tests.inference_demo.test_worker import demo_worker, services_mode  # noqa: F401 (fixtures)
from tests.servers import free_port, started, test_database_url, wait_for

MAX_NEW_TOKENS = 1000  # about ten seconds on a CPU: long enough to see a Stop cut it short
LONG = {
    "prompt": "The for statement",
    "max_new_tokens": MAX_NEW_TOKENS,
    "temperature": 0.7,
    "top_p": 0.9,
    "seed": 0,  # runs to the length limit when nothing stops it
}
STOP_WITHIN_S = 3.0  # from the Stop's answer to the end of the stream on the other process
# The subprocesses get only what is set below: nothing from this test run's settings.
ENV_PREFIXES = (
    "DJANGO_",
    "PORTAL_",
    "DATABASE_",
    "REDIS_",
    "WEIGHTS_",
    "DEMO_",
    "CELERY_",
    "GUNICORN_",
)
DEMO_REDIS_DB = 13  # the subprocess worker's queue and keys, apart from other tests' "demo"


# --- one process: what the row carries ---------------------------------------------------


@pytest.mark.django_db
def test_a_stop_recorded_on_the_row_stops_the_inprocess_run(inprocess):
    row = make_request(max_new_tokens=200)
    events: list[dict] = []
    stopped_at = 0.0
    for event in transport.stream_request(row):
        events.append(event)
        if event["event"] == "delta" and not stopped_at:
            # What the web process that received the Stop leaves behind: only the row.
            assert services.demo_request_cancel(request_id=row.pk) is True
            stopped_at = time.monotonic()
    assert time.monotonic() - stopped_at < 1.0
    assert events[-1] == {"event": "error", "code": "cancelled", "message": runner.MSG_CANCELLED}
    row.refresh_from_db()
    assert row.status == "cancelled" and row.finish_reason == "cancelled"
    assert row.cancel_requested_at is not None and row.tokens_out < 200
    assert services.demo_request_cancel(request_id=row.pk) is False  # ended: nothing to record


@pytest.mark.django_db
def test_a_stop_before_the_stream_starts_is_not_lost_inprocess(inprocess):
    row = make_request(max_new_tokens=200)
    transport.cancel_request(row.pk)
    assert list(transport.stream_request(row)) == [
        {"event": "error", "code": "cancelled", "message": runner.MSG_CANCELLED}
    ]
    row.refresh_from_db()
    assert row.status == "cancelled" and row.tokens_out == 0 and row.started_at is None


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_stop_before_the_stream_starts_reaches_the_redis_worker(demo_worker):
    # The web side clears a request's Redis keys when its stream starts; the row keeps the Stop.
    row = make_request(max_new_tokens=200)
    transport.cancel_request(row.pk)
    events = list(transport.stream_request(row))
    assert events == [{"event": "error", "code": "cancelled", "message": runner.MSG_CANCELLED}]
    row.refresh_from_db()
    assert row.status == "cancelled" and row.tokens_out == 0


@pytest.mark.django_db
def test_the_stop_button_answers_when_redis_is_down(client, grantee, demo_release):
    row = DemoRequest.objects.create(
        user=grantee, release=demo_release, prompt="Hello", params={"max_new_tokens": 8}
    )
    client.force_login(grantee)
    with override_settings(DEMO_TRANSPORT="redis", REDIS_URL="redis://127.0.0.1:1/0"):
        response = client.post(f"/demo/requests/{row.pk}/cancel/")
    assert response.status_code == 200
    assert response.json() == {"id": row.pk, "cancelled": True}
    row.refresh_from_db()
    assert row.cancel_requested_at is not None  # the worker reads it from the row


# --- two web processes -------------------------------------------------------------------


def _own_redis_db(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return url
    return urlunsplit(parts._replace(path=f"/{DEMO_REDIS_DB}"))


def _process_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIXES)}
    (tmp_path / "var").mkdir(exist_ok=True)
    env.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        DEBUG="1",
        SECRET_KEY=settings.SECRET_KEY,  # the session cookie made here must hold there
        DATABASE_URL=test_database_url(),
        PORTAL_VAR_DIR=str(tmp_path / "var"),
        DEMO_MAX_NEW_TOKENS=str(MAX_NEW_TOKENS),
        DEMO_DEVICE="cpu",
        REDIS_URL="",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def _web(name: str, env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """One gunicorn process (one worker) as deployed, on a port of its own."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    env = {**env, "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_WORKERS": "1"}
    args = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py"]
    base = f"http://127.0.0.1:{port}"
    with started(args, env=env, log=log):
        wait_for(
            lambda: requests.get(f"{base}/healthz", timeout=2).ok,
            f"web {name}",
            log=log,
            timeout=60,
        )
        yield base


def _browser(user) -> requests.Session:
    """A signed-in session for the portal on any of its processes (they share the database)."""
    from django.test import Client

    django_client = Client()
    django_client.force_login(user)
    csrf = get_random_string(32)
    browser = requests.Session()
    browser.cookies.set(
        settings.SESSION_COOKIE_NAME, django_client.cookies[settings.SESSION_COOKIE_NAME].value
    )
    browser.cookies.set(settings.CSRF_COOKIE_NAME, csrf)
    browser.headers["X-CSRFToken"] = csrf
    return browser


def _events(response: requests.Response) -> Iterator[tuple[str, dict]]:
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            lines = dict(line.split(": ", 1) for line in frame.decode().splitlines())
            yield lines["event"], json.loads(lines["data"])


def _stop_through_the_other_process(
    stream: requests.Response, browser: requests.Session, other: str, cancel_path: str
) -> tuple[list[tuple[str, dict]], float]:
    """Read A's stream; at its first delta, Stop through B; return the events and the wait."""
    events: list[tuple[str, dict]] = []
    stopped_at = None
    for name, data in _events(stream):
        events.append((name, data))
        if name == "request":
            request_id = data["id"]
        if name == "delta" and stopped_at is None:
            answer = browser.post(other + cancel_path.format(id=request_id), timeout=10)
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"id": request_id, "cancelled": True}
            stopped_at = time.monotonic()
    assert stopped_at is not None, events
    return events, time.monotonic() - stopped_at


def _assert_stopped(events: list[tuple[str, dict]], waited: float) -> None:
    names = [name for name, _ in events]
    assert names[-1] == "error" and events[-1][1]["code"] == "cancelled", names[-3:]
    assert waited < STOP_WITHIN_S
    row = DemoRequest.objects.get(pk=events[0][1]["id"])
    assert row.status == "cancelled" and row.finish_reason == "cancelled"
    assert row.cancel_requested_at is not None
    assert 0 < row.tokens_out < MAX_NEW_TOKENS // 2


@pytest.mark.django_db(transaction=True)
def test_stop_through_another_web_process_reaches_the_inprocess_engine(tmp_path, grantee, demo_dir):
    env = _process_env(tmp_path, DEMO_TRANSPORT="inprocess")
    browser = _browser(grantee)
    with _web("a", env, tmp_path) as a, _web("b", env, tmp_path) as b:
        stream = browser.post(f"{a}/api/demo/{DEMO}/generate/", json=LONG, stream=True, timeout=60)
        assert stream.status_code == 200, stream.text
        events, waited = _stop_through_the_other_process(
            stream, browser, b, "/demo/requests/{id}/cancel/"
        )
    _assert_stopped(events, waited)


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_stop_through_another_web_process_reaches_the_redis_worker(
    tmp_path, grantee, demo_dir, redis_url
):
    import redis

    url = _own_redis_db(redis_url)
    client = redis.Redis.from_url(url)
    client.delete("demo", *client.keys("demo:*"))
    env = _process_env(tmp_path, DEMO_TRANSPORT="redis", REDIS_URL=url)
    name = f"demo-cancel-{os.getpid()}@test"
    worker = [sys.executable, "-m", "celery", "-A", "portal", "worker", "-Q", "demo"]
    worker += ["--pool", "threads", "--concurrency", "4", "-n", name, "--without-mingle"]
    browser = _browser(grantee)
    log = tmp_path / "worker.log"
    try:
        with started(worker, env=env, log=log):
            wait_for(
                lambda: client.exists(transport.worker_key(name)),
                "demo worker",
                log=log,
                timeout=60,
            )
            with _web("a", env, tmp_path) as a, _web("b", env, tmp_path) as b:
                stream = browser.post(
                    f"{a}/demo/{DEMO}/generate/", data=LONG, stream=True, timeout=60
                )
                assert stream.status_code == 200, stream.text
                events, waited = _stop_through_the_other_process(
                    stream, browser, b, "/api/demo/requests/{id}/cancel/"
                )
    finally:
        client.delete("demo", *client.keys("demo:*"))
    assert "started" in [name for name, _ in events]
    _assert_stopped(events, waited)
