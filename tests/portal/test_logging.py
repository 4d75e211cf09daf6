from __future__ import annotations

import logging

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
