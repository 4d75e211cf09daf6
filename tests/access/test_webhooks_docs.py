"""The code in docs/webhooks.md is the code that is tested: the verification snippet is
the source of access.webhook_signing.verify, runs on the standard library alone, and the
example receiver and the curl recipe work against the real thing."""

from __future__ import annotations

import ast
import inspect
import socket
import subprocess
import sys
import time

import pytest

from access import webhook_signing
from access.models import WebhookDelivery, WebhookEndpoint
from access.services import webhooks
from tests.access.webhook_receiver import docs_block, documented_verify, receiving
from tests.conftest import require_tools
from tests.servers import free_port, process_env, started, wait_for

SECRET = "whsec_docs-test"
BODY = b'{"id":"1","type":"ping","created_at":"2026-01-01T00:00:00+00:00","data":{}}'


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def test_the_documented_snippet_is_the_source_of_the_tested_function():
    snippet = docs_block("verify-snippet")
    assert inspect.getsource(webhook_signing.verify) in snippet
    imported = [
        alias.name
        for node in ast.parse(snippet).body
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    assert imported == ["hashlib", "hmac", "time"]
    assert [type(node).__name__ for node in ast.parse(snippet).body] == [
        "Import",
        "Import",
        "Import",
        "FunctionDef",
    ]


def test_the_snippet_runs_on_the_standard_library_alone(tmp_path):
    """No site-packages (-S), no environment (-I): nothing of Django or the portal."""
    now = int(time.time())
    good = webhook_signing.sign(SECRET, BODY, now)
    stale = webhook_signing.sign(SECRET, BODY, now - 301)
    check = (
        docs_block("verify-snippet")
        + "\nimport sys\n"
        + "secret, body, *headers = sys.argv[1:]\n"
        + "print([verify(secret, body.encode(), h) for h in headers])\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", check, SECRET, BODY.decode(), good, stale],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "[True, False]"


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def test_the_example_receiver_verifies_a_real_test_event_and_refuses_a_forged_one(
    db, tmp_path, django_capture_on_commit_callbacks
):
    receiver = docs_block("receiver-example").replace(
        "# ... the verify() function from above ...\n", docs_block("verify-snippet")
    )
    assert "def verify" in receiver
    script = tmp_path / "receiver.py"
    script.write_text(receiver)
    port = free_port()
    log = tmp_path / "receiver.log"
    env = process_env({"WEBHOOK_SECRET": SECRET, "PORT": str(port)})
    with started([sys.executable, str(script)], env=env, log=log) as process:
        wait_for(lambda: _listening(port), "the example receiver", log=log, process=process)
        endpoint = WebhookEndpoint.objects.create(
            url=f"http://127.0.0.1:{port}/", event_types=["grant.revoked"]
        )
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(secret=SECRET)
        endpoint.refresh_from_db()
        with django_capture_on_commit_callbacks(execute=True):
            good = webhooks.ping_send(endpoint=endpoint)
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(secret="whsec_someone-else")
        endpoint.refresh_from_db()
        with django_capture_on_commit_callbacks(execute=True):
            forged = webhooks.ping_send(endpoint=endpoint)
        wait_for(lambda: f"verified ping {good.uuid}" in log.read_text(), "the receiver's line")
    good.refresh_from_db()
    forged.refresh_from_db()
    assert good.status == WebhookDelivery.Status.DELIVERED and good.last_response_status == 204
    assert forged.status == WebhookDelivery.Status.PENDING and forged.last_response_status == 400
    assert str(forged.uuid) not in log.read_text()


def test_the_curl_recipe_sends_a_request_that_verify_accepts(tmp_path):
    require_tools("curl", "openssl")
    with receiving() as receiver:
        recipe = (
            docs_block("curl-example")
            .replace("SECRET=whsec_...", f"SECRET={SECRET}")
            .replace("URL=http://127.0.0.1:9000/", f"URL={receiver.url('/')}")
        )
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", recipe],
            capture_output=True,
            text=True,
            timeout=30,
            env=process_env({"NO_PROXY": "127.0.0.1"}),
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "204"
    (request,) = receiver.received
    verify = documented_verify()
    assert verify(SECRET, request.body, request.headers["X-Portal-Signature"])
    assert not verify(SECRET, request.body + b" ", request.headers["X-Portal-Signature"])
    assert request.payload["type"] == "ping"
