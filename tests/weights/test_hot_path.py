"""The hot path of a file request: a constant, small number of queries, nothing cached.

One SELECT resolves the link, its grant, user, license facts and the file; one
conditional UPDATE charges the budget. The download event goes to the journal, which
inserts in batches (test_event_journal.py proves that append makes no query); here it
is captured so that only the request's own queries are counted.
"""

# ruff: noqa: F811 (fixtures imported from test_serving are used as arguments)
from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.weights.test_serving import (
    MIB,
    SHARD,
    body,
    charged,
    file_url,
    get,
    grant,  # noqa: F401 (fixture)
    s3_token,  # noqa: F401 (fixture)
    source,  # noqa: F401 (fixture)
)
from weights import serving
from weights.services import links

pytestmark = pytest.mark.django_db


@pytest.fixture
def events(monkeypatch) -> list[dict]:
    recorded: list[dict] = []
    monkeypatch.setattr(serving, "download_event_record", lambda **kw: recorded.append(kw))
    return recorded


@pytest.fixture
def token(source, grant) -> str:
    return links.link_issue(grant=grant, budget_copies=1000).token


def queries_of(client, url: str, method: str = "get", **headers) -> tuple[int, list[str], bytes]:
    with CaptureQueriesContext(connection) as captured:
        response = get(client, url, **headers) if method == "get" else client.head(url, **headers)
        data = body(response) if response.status_code < 300 else b""
    return response.status_code, [q["sql"].split()[0] for q in captured.captured_queries], data


@pytest.mark.parametrize(
    "headers",
    [{"HTTP_RANGE": "bytes=1000-66535"}, {}],
    ids=["64 KiB range", "whole 1 MiB file"],
)
def test_a_local_file_request_is_one_select_and_one_update(client, token, source, events, headers):
    status, kinds, data = queries_of(client, file_url(token), **headers)
    assert status in (200, 206)
    assert kinds == ["SELECT", "UPDATE"]
    assert data == (source / SHARD).read_bytes()[1000:66536] if headers else len(data) == MIB
    assert charged() == len(data)
    assert [e["outcome"] for e in events] == ["served"]


def test_x_accel_and_refusals_stay_within_the_same_count(client, token, events, settings):
    settings.WEIGHTS_X_ACCEL_PREFIX = "/_weights/"
    status, kinds, _ = queries_of(client, file_url(token), HTTP_RANGE="bytes=0-99")
    assert (status, kinds) == (200, ["SELECT", "UPDATE"])
    # HEAD, 304 and 416 never touch the budget: the one SELECT.
    assert queries_of(client, file_url(token), "head")[1] == ["SELECT"]


def test_s3_redirect_is_one_select_and_one_update(client, s3_token, events):
    token, _ = s3_token
    status, kinds, _ = queries_of(client, file_url(token), HTTP_RANGE="bytes=0-99")
    assert status == 302
    assert kinds == ["SELECT", "UPDATE"]


def test_a_revocation_is_seen_by_the_very_next_request(client, token, events, reviewer):
    assert len(body(get(client, file_url(token), HTTP_RANGE="bytes=0-9"))) == 10
    links.link_revoke(link=links.link_resolve(token), actor=reviewer, reason="Shared publicly.")
    assert get(client, file_url(token), HTTP_RANGE="bytes=0-9").status_code == 403
    assert [e["outcome"] for e in events] == ["served", "revoked"]


def test_a_long_stream_adds_one_update_per_doubling_step(client, token, events, monkeypatch):
    """Charged a step ahead: 64 KiB, then 128, 256, 512 KiB (the step doubles)."""
    from weights.services import budget

    monkeypatch.setattr(budget, "FIRST_STEP", 64 * 1024)
    status, kinds, data = queries_of(client, file_url(token))
    assert (status, len(data)) == (200, MIB)
    assert kinds == ["SELECT"] + ["UPDATE"] * 5


def test_files_carry_their_own_policy_and_pages_keep_the_site_policy(client, token, events):
    response = get(client, file_url(token), HTTP_RANGE="bytes=0-9")
    assert response["Content-Security-Policy"] == "default-src 'none'; sandbox"
    body(response)
    page = client.get(f"/d/{token}/")
    assert "script-src" in page["Content-Security-Policy"]
    assert "sandbox" not in page["Content-Security-Policy"]


def _prepared() -> dict[str, int]:
    """The prepared statements of this connection: first word -> times executed."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements")
        return {row[0].split()[0]: row[1] for row in cursor.fetchall()}


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite has no prepared statements to check"
)
def test_on_postgresql_the_two_statements_are_prepared_once_per_connection(
    client, token, events, settings
):
    for i in range(3):
        assert (
            len(body(get(client, file_url(token), HTTP_RANGE=f"bytes={i * 10}-{i * 10 + 9}"))) == 10
        )
    runs = _prepared()
    assert sorted(runs) == ["SELECT", "UPDATE"] and min(runs.values()) >= 3
    # Behind a transaction-mode pooler they can be turned off: plain statements again.
    settings.WEIGHTS_PREPARED_STATEMENTS = False
    assert len(body(get(client, file_url(token), HTTP_RANGE="bytes=30-39"))) == 10
    assert _prepared() == runs
    assert charged() == 40
