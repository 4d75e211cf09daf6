"""HTTP framing on a real gunicorn, started as deployed (deploy/gunicorn.conf.py, DEBUG off).

Django's test client strips HEAD bodies by itself, so only a real server shows what goes
on the wire: a HEAD answered with a body, or a 304 claiming `Content-Length: 0`, breaks
the keep-alive connection a download client or a proxy reuses for its next request.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from access.services.reviews import application_approve
from tests.servers import free_port, healthz_answers, started, test_database_url, wait_for
from weights.management.commands.generate_sample_release import MIB, write_sample_release
from weights.models import Artifact
from weights.services.links import link_issue
from weights.services.publishing import release_publish
from weights.storage import reset_storage

pytestmark = pytest.mark.django_db(transaction=True)

SHARD = "7B/consolidated.00.pth"
BAD_TOKEN = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


@pytest.fixture
def store(settings, tmp_path) -> Path:
    settings.WEIGHTS_STORAGE = "local"
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "store"
    reset_storage()
    yield settings.WEIGHTS_LOCAL_ROOT
    reset_storage()


@pytest.fixture
def web(tmp_path, store) -> Iterator[int]:
    """gunicorn (one worker, keep-alive on) on the test database; yields its port."""
    port = free_port()
    prefixes = ("DJANGO_", "PORTAL_", "DATABASE_", "REDIS_", "WEIGHTS_", "GUNICORN_", "CELERY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    (tmp_path / "var").mkdir()
    env.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        DEBUG="0",
        SECRET_KEY=settings.SECRET_KEY + "-" + "x" * 50,
        ALLOWED_HOSTS="127.0.0.1",
        SECURE_SSL_REDIRECT="0",
        DATABASE_URL=test_database_url(),
        DATABASE_CONN_MAX_AGE="0",
        REDIS_URL="",
        PORTAL_VAR_DIR=str(tmp_path / "var"),
        WEIGHTS_STORAGE="local",
        WEIGHTS_LOCAL_ROOT=str(store),
        GUNICORN_BIND=f"127.0.0.1:{port}",
        GUNICORN_WORKERS="1",
        GUNICORN_THREADS="4",
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "gunicorn.log"
    args = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py"]
    with started(args, env=env, log=log) as process:
        wait_for(lambda: healthz_answers(port), "gunicorn", log=log, timeout=60, process=process)
        yield port


@pytest.fixture
def token(store, tmp_path, alice, reviewer, make_submitted, releases) -> str:
    source = tmp_path / "src"
    write_sample_release(source, size_label="7B", shards=1, shard_bytes=MIB, seed=1)
    release_publish(directory=source, slug="llama-7b")
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    return link_issue(grant=grant).token


def raw(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    """Everything the server writes for one request on a connection it then closes."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def test_head_sends_no_body_and_the_connection_stays_usable(web, token):
    pages = {  # path: status of its GET
        "/nowhere/": 404,
        "/": 200,
        f"/d/{BAD_TOKEN}/{SHARD}": 404,
        f"/d/{token}/": 200,
        f"/d/{token}/{SHARD}": 200,
        "/api/nowhere/": 404,
    }
    for path, expected in pages.items():
        status, headers, body = split(raw(web, "HEAD", path))
        assert (status, body) == (expected, b""), (path, body[:200])
        assert "content-length" in headers, path
    _, headers, _ = split(raw(web, "HEAD", f"/d/{token}/{SHARD}"))
    assert headers["content-length"] == str(MIB)

    # One keep-alive connection: each HEAD leaves it ready for the GET that follows.
    client = http.client.HTTPConnection("127.0.0.1", web, timeout=10)
    try:
        for path, expected in pages.items():
            client.request("HEAD", path)
            head = client.getresponse()
            assert (head.status, head.read()) == (expected, b""), path
            assert head.getheader("Connection") != "close"
            client.request("GET", path)
            get = client.getresponse()
            body = get.read()
            assert get.status == expected and body, path
            assert head.getheader("Content-Type") == get.getheader("Content-Type"), path
        client.request("GET", "/healthz")
        assert client.getresponse().read() == b"ok"
    finally:
        client.close()


def test_a_304_has_no_content_length_and_no_body(web, token):
    etag = f'"{Artifact.objects.get(path=SHARD).sha256}"'
    status, headers, body = split(raw(web, "GET", f"/d/{token}/{SHARD}", {"If-None-Match": etag}))
    assert (status, body) == (304, b"")
    assert "content-length" not in headers and "transfer-encoding" not in headers
    assert headers["etag"] == etag

    client = http.client.HTTPConnection("127.0.0.1", web, timeout=10)
    try:
        client.request("GET", f"/d/{token}/{SHARD}", headers={"If-None-Match": etag})
        not_modified = client.getresponse()
        assert (not_modified.status, not_modified.read()) == (304, b"")
        client.request("GET", "/healthz")
        assert client.getresponse().read() == b"ok"
    finally:
        client.close()
