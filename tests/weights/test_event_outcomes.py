"""Download events say what happened: HEAD, 304, 416 and a storage outage are outcomes of
their own in every serving mode, and operator figures count only what delivered bytes."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.core.management import call_command

from tests.weights import test_serving
from tests.weights.test_serving import SHARD, artifact, body, charged, file_url, get
from weights.management.commands.generate_sample_release import MIB
from weights.models import DownloadEvent

pytestmark = pytest.mark.django_db

# The published llama-7b release, alice's grant and a link with a budget of 2 copies.
source, grant, token, s3_token = (
    test_serving.source,
    test_serving.grant,
    test_serving.token,
    test_serving.s3_token,
)


def events() -> list[tuple[int, str, int]]:
    return list(DownloadEvent.objects.order_by("pk").values_list("status_code", "outcome", "bytes"))


@pytest.fixture(params=["local", "x-accel", "s3"])
def any_mode_token(request, settings) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_token")[0]
    if request.param == "x-accel":
        settings.WEIGHTS_X_ACCEL_PREFIX = "/_weights/"
    return request.getfixturevalue("token")


def test_head_304_and_416_are_recorded_as_such_in_every_serving_mode(client, any_mode_token):
    url = file_url(any_mode_token)
    assert client.head(url).status_code == 200
    etag = f'"{artifact().sha256}"'
    assert get(client, url, HTTP_IF_NONE_MATCH=etag).status_code == 304
    assert get(client, url, HTTP_RANGE=f"bytes={MIB}-").status_code == 416

    assert events() == [(200, "head", 0), (304, "not_modified", 0), (416, "bad_range", 0)]
    assert charged() == 0


def test_missing_bytes_in_storage_are_recorded_as_unavailable(client, token, local_storage):
    local_storage.delete(artifact().storage_key)
    assert get(client, file_url(token)).status_code == 503
    assert events() == [(503, "unavailable", 0)]


@pytest.fixture
def mixed_requests(client, token, source) -> None:
    """A full copy, 100 bytes of a range, and three requests that deliver nothing."""
    url = file_url(token)
    assert body(get(client, url)) == (source / SHARD).read_bytes()
    assert len(body(get(client, url, HTTP_RANGE="bytes=0-99"))) == 100
    client.head(url)
    get(client, url, HTTP_IF_NONE_MATCH=f'"{artifact().sha256}"')
    get(client, url, HTTP_RANGE=f"bytes={MIB}-")


def test_portal_stats_counts_only_requests_that_delivered_bytes(mixed_requests):
    out = io.StringIO()
    call_command("portal_stats", "--json", stdout=out)
    seven = next(r for r in json.loads(out.getvalue())["downloads"] if r["release"] == "llama-7b")
    assert (seven["requests"], seven["delivered"], seven["bytes"]) == (5, 2, MIB + 100)


def test_export_records_says_what_each_request_got(mixed_requests):
    out = io.StringIO()
    call_command("export_records", "downloads", stdout=out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["outcome"], r["status_code"], r["bytes"]) for r in rows] == [
        ("served", "200", str(MIB)),
        ("served", "206", "100"),
        ("head", "200", "0"),
        ("not_modified", "304", "0"),
        ("bad_range", "416", "0"),
    ]
