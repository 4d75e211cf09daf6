from __future__ import annotations

import io
import logging
import socket
import sys
import threading
from urllib.parse import unquote

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.core.servers.basehttp import WSGIRequestHandler, WSGIServer

from portal.logging_filters import RedactTokensFilter, redact


def test_download_tokens_are_masked_in_log_lines():
    token = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    assert (
        redact(f'"GET /d/{token}/7B/consolidated.00.pth HTTP/1.1" 200')
        == '"GET /d/<token>/7B/consolidated.00.pth HTTP/1.1" 200'
    )
    record = logging.LogRecord(
        "django.request", logging.WARNING, __file__, 1, "Not Found: %s", (f"/d/{token}/x",), None
    )
    RedactTokensFilter().filter(record)
    assert token not in record.getMessage() and record.getMessage() == "Not Found: /d/<token>/x"


def test_console_handler_carries_the_filter(settings):
    assert "redact_tokens" in settings.LOGGING["handlers"]["console"]["filters"]


def test_django_request_and_server_loggers_use_the_filtered_handler(settings):
    loggers = settings.LOGGING["loggers"]
    for name in ("django", "django.server"):
        assert loggers[name]["handlers"] == ["console"] and loggers[name]["propagate"] is False


def test_a_404_for_a_token_url_logs_no_token(client, caplog, db):
    token = "ZyXwVuTsRqPoNmLkJiHgFeDcBa987654"
    with caplog.at_level(logging.WARNING, logger="django.request"):
        client.get(f"/d/{token}/\n")
        client.get(f"/nowhere/d/{token}/x")
    handler_filter = RedactTokensFilter()
    for record in caplog.records:
        handler_filter.filter(record)
        assert token not in record.getMessage()


# --- every spelling of a secret URL is masked -------------------------------------------

TOKEN = "Tk9qR3xZ7wPq2LmN8vB4cD6fG1hJ5kS0"
ENCODED = "".join(f"%{ord(c):02X}" for c in TOKEN)
# Spellings that gunicorn (one percent-decoding into PATH_INFO, %2f included) hands to
# Django as a download link, and ones that browsers or nginx resolve to one.
SPELLINGS = {
    "plain": (f"/d/{TOKEN}/params.json", "/d/<token>/params.json"),
    "escaped d": (f"/%64/{TOKEN}/", "/d/<token>/"),
    "escaped slash": (f"/d%2f{TOKEN}/", "/d/<token>/"),
    "escaped slash before the file": (f"/d/{TOKEN}%2Fparams.json", "/d/<token>/params.json"),
    "escaped token": (f"/d/{ENCODED}/", "/d/<token>/"),
    "dot-dot segment": (f"/d/x/../{TOKEN}/", "/d/<token>/"),
    "escaped dot-dot": (f"/d/x/%2e%2e%2f{TOKEN}/", "/d/<token>/"),
    "dot segment": (f"/d/./{TOKEN}/", "/d/<token>/"),
    "double slash": (f"//d/{TOKEN}/", "//d/<token>/"),
    "backslash": (f"/d\\{TOKEN}/", "/d/<token>/"),
    "escaped twice": (f"/%2564/{TOKEN}/", "/d/<token>/"),
    "parameter": (f"/d;x/{TOKEN}/", "/d;x/<token>/"),
    "moved out by dot-dots": (f"/d/x/../../{TOKEN}", "/<token>"),
    "escaped twice, token only": ("/" + ENCODED.replace("%", "%25") + "/", "/<token>/"),
    "in the query": (
        f"/accounts/login/?next=%2Fd%2F{TOKEN}%2F",
        "/accounts/login/?next=/d/<token>/",
    ),
    "absolute form": (f"https://portal.example/d/{TOKEN}/", "https://portal.example/d/<token>/"),
}


@pytest.mark.parametrize("spelling", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_every_spelling_of_a_link_is_logged_masked_as_routed(spelling):
    path, routed = spelling
    line = redact(f'127.0.0.1 "GET {path} HTTP/1.1" 404 "-"')
    assert line == f'127.0.0.1 "GET {routed} HTTP/1.1" 404 "-"'
    assert_no_token(line, TOKEN)


def assert_no_token(text: str, token: str) -> None:
    """Neither the token nor any percent-encoded form of it."""
    for _ in range(3):
        assert token not in text and token[:12] not in text
        text = unquote(text)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "https://portal.example/accounts/password/reset/key/1-c5b8k3-0f1e2d3c4b5a69788796/",
            "https://portal.example/accounts/password/reset/key/<key>",
        ),
        (
            "/accounts/password/reset/key/1-%63%35b8k3-0f1e2d3c4b5a69/",
            "/accounts/password/reset/key/<key>",
        ),
        (
            "/accounts/confirm-email/MQ:1tXyzQ:aB3dE5fG7hJ9kL1mN3pQ5rS7tU9/",
            "/accounts/confirm-email/<key>",
        ),
        ("/accounts/x/..%2fconfirm-email/MQ:1tXyzQ:aB3dE5fG7h/", "/accounts/confirm-email/<key>"),
    ],
)
def test_password_reset_and_email_confirmation_keys_are_masked(url, masked):
    assert redact(f"GET {url} 200") == f"GET {masked} 200"


@pytest.mark.parametrize(
    "text",
    [
        '"GET /accounts/password/reset/key/1-set-password/ HTTP/1.1" 200',
        '"GET /accounts/confirm-email/ HTTP/1.1" 200',
        '"GET /llama/LLaMA-7B/resolve/0123456789abcdef0123456789abcdef01234567/params.json"',
        '"GET /static/portal/../portal/site.css HTTP/1.1" 200',
        '"GET /releases/?q=50%25 HTTP/1.1" 200 "https://portal.example/releases/"',
        "Upload at 50% / 100%",
    ],
)
def test_lines_without_a_secret_keep_their_spelling(text):
    assert redact(text) == text


def test_a_masked_url_cannot_forge_a_line_or_close_a_quote():
    line = redact(f'"GET /%64/{TOKEN}/%0a127.0.0.1%20%22GET%20/admin/ HTTP/1.1" 200')
    assert "\n" not in line and line.count('"') == 2
    assert line == '"GET /d/<token>/%0A127.0.0.1%20%22GET%20/admin/ HTTP/1.1" 200'


def test_the_filter_masks_tracebacks_too():
    try:
        raise ValueError(f"no route for /%64/{TOKEN}/")
    except ValueError:
        record = logging.LogRecord(
            "django.request", logging.ERROR, __file__, 1, "boom", (), sys.exc_info()
        )
    RedactTokensFilter().filter(record)
    assert_no_token(logging.Formatter().format(record), TOKEN)
    assert "/d/<token>/" in record.exc_text


@pytest.mark.django_db(transaction=True)
def test_runserver_access_lines_mask_every_spelling():
    """Django's development server (`make run`) logs each raw request line to
    django.server, through the console handler and its filter."""
    server = WSGIServer(("127.0.0.1", 0), WSGIRequestHandler)
    # portal.wsgi's application, without the django.setup() that would reconfigure logging.
    server.set_app(WSGIHandler())
    handler = logging.getLogger("django.server").handlers[0]
    captured = io.StringIO()
    previous = handler.setStream(captured)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for path, _ in SPELLINGS.values():
            if path.startswith("/"):
                request(server.server_port, path)
    finally:
        server.shutdown()
        server.server_close()
        handler.setStream(previous)
    out = captured.getvalue()
    assert out.count('"GET /d/<token>/') >= 8, out
    assert_no_token(out, TOKEN)


def request(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: testserver\r\nConnection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return int(response.split(b" ", 2)[1])


def test_api_tokens_are_masked_wherever_they_appear(alice):
    from tests.tokens import api_token

    secret = api_token(alice)
    for line in (
        f"Authorization: Bearer {secret}",
        f"token={secret}&x=1",
        f"GET /api/applications/?access_token={secret} HTTP/1.1",
    ):
        masked = redact(line)
        assert secret not in masked and secret[4:] not in masked
        assert "lap_<token>" in masked
