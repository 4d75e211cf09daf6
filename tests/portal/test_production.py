"""Production behaviour: request ids, JSON logs without tokens, Content-Security-Policy."""

from __future__ import annotations

import html
import io
import json
import logging
import re
import urllib.request

import pytest
from django.conf import settings
from django.test import RequestFactory
from django.utils.module_loading import import_string

from access.services.reviews import application_approve
from tests.factories import ReleaseFactory
from tests.portal.test_settings import PRODUCTION, manage

TOKEN = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


# --- request ids -------------------------------------------------------------------------


def test_a_request_id_is_generated_when_none_is_sent(client, db):
    first = client.get("/healthz")["X-Request-ID"]
    second = client.get("/healthz")["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second


def test_a_sane_request_id_from_the_proxy_is_echoed(client, db):
    response = client.get("/healthz", HTTP_X_REQUEST_ID="7f3c2a9e-proxy.id:1")
    assert response["X-Request-ID"] == "7f3c2a9e-proxy.id:1"


@pytest.mark.parametrize("sent", ["has space", "x" * 200, "/d/" + TOKEN, "<script>", "-lead"])
def test_an_odd_request_id_is_replaced(client, db, sent):
    response = client.get("/healthz", HTTP_X_REQUEST_ID=sent)
    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])


# --- JSON logs ---------------------------------------------------------------------------


@pytest.fixture
def json_log():
    """The configured console handler's pieces (JSON formatter, filters) writing to a buffer."""
    conf = settings.LOGGING
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(import_string(conf["formatters"]["json"]["()"])())
    for name in conf["handlers"]["console"]["filters"]:
        handler.addFilter(import_string(conf["filters"][name]["()"])())
    loggers = [logging.getLogger(), logging.getLogger("django")]
    for logger in loggers:
        logger.addHandler(handler)
    yield stream
    for logger in loggers:
        logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_request_id_and_never_a_token(client, db, json_log):
    client.get(f"/d/{TOKEN}/7B/consolidated.00.pth", HTTP_X_REQUEST_ID="req-42")
    client.get(f"/nowhere/d/{TOKEN}/x", HTTP_X_REQUEST_ID="req-43")
    logging.getLogger("portal.test").info("outside a request")
    assert TOKEN not in json_log.getvalue()
    lines = _lines(json_log)
    by_id = {line["request_id"] for line in lines}
    assert {"req-42", "req-43", "-"} <= by_id
    not_found = next(line for line in lines if line["request_id"] == "req-43")
    assert not_found["level"] == "WARNING" and not_found["logger"] == "django.request"
    assert not_found["message"] == "Not Found: /nowhere/d/<token>/x"
    assert not_found["path"] == "/nowhere/d/<token>/x" and "request" not in not_found
    assert {"time", "level", "logger", "message", "request_id"} <= set(lines[-1])


def test_exception_text_and_extras_are_cleaned_too(json_log):
    request = RequestFactory().get(f"/d/{TOKEN}/x")
    try:
        raise RuntimeError(f"failed on /d/{TOKEN}/params.json")
    except RuntimeError:
        logging.getLogger("django.request").error(
            "Internal Server Error: %s",
            request.path,
            exc_info=True,
            extra={"status_code": 500, "request": request, "url": f"/d/{TOKEN}/a"},
        )
    assert TOKEN not in json_log.getvalue()
    (line,) = _lines(json_log)
    assert line["status_code"] == 500 and line["url"] == "/d/<token>/a"
    assert "RuntimeError: failed on /d/<token>/params.json" in line["exc_info"]


def test_production_logs_json_lines_through_manage_py():
    script = (
        "from django.test import Client; "
        f"r = Client().get('/nowhere/d/{TOKEN}/x', secure=True, "
        "HTTP_HOST='llama.example.org', HTTP_X_REQUEST_ID='req-prod-1'); "
        "from django.conf import settings as s; "
        "print(r.status_code, s.LOG_FORMAT, s.CONTENT_SECURITY_POLICY['DIRECTIVES']['upgrade-insecure-requests'])"
    )
    result = manage("shell", "-c", script, env=PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["404", "json", "True"]
    assert TOKEN not in result.stderr + result.stdout
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(
        line["request_id"] == "req-prod-1" and line["path"] == "/nowhere/d/<token>/x"
        for line in lines
    ), result.stderr


def test_development_logs_plain_lines_with_the_request_id(settings):
    assert settings.LOG_FORMAT == "plain"
    assert "%(request_id)s" in settings.LOGGING["formatters"]["plain"]["format"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT must be one of"),
        ({"PORTAL_REVIEW_REMINDER_DAYS": "-1"}, "PORTAL_REVIEW_REMINDER_DAYS must be at least 0"),
    ],
)
def test_bad_operations_settings_fail_loudly(env, message):
    result = manage("check", env=env)
    assert result.returncode != 0 and message in result.stderr


# --- Content-Security-Policy --------------------------------------------------------------


def _policy(response) -> dict[str, str]:
    parts = (part.strip().split(" ", 1) for part in response["Content-Security-Policy"].split(";"))
    return {p[0]: (p[1] if len(p) > 1 else "") for p in parts}


@pytest.fixture
def demo_grantee(alice, reviewer, make_submitted, releases):
    demo = ReleaseFactory(slug="llama-demo", name="LLaMA demo", sort_order=10)
    releases[demo.slug] = demo
    application = make_submitted(alice, slugs=("llama-demo",))
    application_approve(application=application, reviewer=reviewer, releases=[demo])
    return alice


def test_the_demo_script_runs_under_the_nonce_in_the_header(client, demo_grantee):
    client.force_login(demo_grantee)
    response = client.get("/demo/llama-demo/")
    assert response.status_code == 200
    policy = _policy(response)
    nonce = re.fullmatch(r"'self' 'nonce-([A-Za-z0-9+/=]+)'", policy["script-src"]).group(1)
    page = response.content.decode()
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert f'<script nonce="{nonce}">' in scripts
    # Every inline script carries the nonce; others load from this origin or are data.
    for tag in scripts:
        assert f'nonce="{nonce}"' in tag or "src=" in tag or 'type="application/json"' in tag
    assert policy["default-src"] == "'self'" and policy["object-src"] == "'none'"
    assert policy["style-src"] == "'self' 'unsafe-inline'"
    assert policy["frame-ancestors"] == "'none'" and policy["form-action"] == "'self'"
    assert "upgrade-insecure-requests" not in policy  # development serves plain HTTP


def test_each_response_gets_a_fresh_nonce(client, demo_grantee):
    client.force_login(demo_grantee)
    first = _policy(client.get("/demo/llama-demo/"))["script-src"]
    second = _policy(client.get("/demo/llama-demo/"))["script-src"]
    assert first != second


def test_pages_without_inline_scripts_allow_none(client, db):
    response = client.get("/")
    assert _policy(response)["script-src"] == "'self'"
    assert response["Referrer-Policy"] == "same-origin"


def test_the_swagger_page_is_under_the_policy_and_served_from_this_origin(live_server, db):
    def fetch(path: str) -> tuple[int, dict[str, str], bytes]:
        with urllib.request.urlopen(live_server.url + path, timeout=10) as response:
            return response.status, dict(response.headers), response.read()

    status, headers, body = fetch("/api/docs/")
    assert status == 200
    policy = _policy({"Content-Security-Policy": headers["Content-Security-Policy"]})
    assert policy["script-src"] == "'self'" and policy["default-src"] == "'self'"
    page = body.decode()
    # No inline code, nothing from elsewhere: every script and stylesheet is a path here.
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S)
    assert len(scripts) == 3 and all(
        "src=" in attrs and not code.strip() for attrs, code in scripts
    )
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(assets) == 5
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
        status, headers, content = fetch(html.unescape(asset))
        assert status == 200 and content, asset
    assert "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page
    _, _, script = fetch("/api/docs/?script=")
    assert b'url: "/api/schema/"' in script and b"https://" not in script
