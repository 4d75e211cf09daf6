"""The rule for what a download costs (docs/downloads.md, "What a download costs").

Bytes are charged as the portal sends them (local) or authorises them (X-Accel, S3). An
address re-asking for bytes it was already charged for gets them free, up to
WEIGHTS_RESUME_FREE_COPIES copies' worth per file; another address always pays; each file
allows N copies plus a slack of min(WEIGHTS_BUDGET_SLACK_BYTES, size); a request that
cannot finish within what is left is refused before it starts. Real clients over real
servers: test_client_matrix.py.
"""

# ruff: noqa: F811 (the fixtures imported from test_serving are used as arguments)
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.core.cache import cache
from django.db import connection
from django.test import Client

from tests.weights.test_serving import (
    CHUNK,
    MIB,
    SHARD,
    artifact,
    body,
    charged,
    file_url,
    get,
    grant,  # noqa: F401 (fixture)
    hang_up,
    publish,
    source,  # noqa: F401 (fixture)
)
from weights import serving
from weights.models import DownloadEvent, LinkUsage
from weights.services import budget, links

pytestmark = pytest.mark.django_db

A, B = "198.51.100.10", "203.0.113.20"


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(serving, "CHUNK_SIZE", CHUNK)


@pytest.fixture
def one_copy(source, grant) -> str:
    return links.link_issue(grant=grant, budget_copies=1).token


def forgiven() -> int:
    return sum(
        LinkUsage.objects.filter(artifact=artifact()).values_list("bytes_forgiven", flat=True)
    )


def cut_after(client, url: str, chunks: int, **headers) -> bytes:
    """Read `chunks` chunks, ask for one more (written to the socket, never received),
    then go away, as a killed wget does."""
    response = get(client, url, **headers)
    stream = iter(response.streaming_content)
    received = b"".join(next(stream) for _ in range(chunks + 1))[: chunks * CHUNK]
    hang_up(response)
    return received


def read_until_stopped_data(response) -> list[bytes]:
    chunks: list[bytes] = []
    with pytest.raises(serving.StreamStopped):
        chunks.extend(response.streaming_content)
    return chunks


def test_a_resume_from_the_same_address_does_not_pay_twice_for_what_a_cut_lost(
    client,
    one_copy,
    source,
):
    """The client had only 6 chunks when it died although 8 were written: it resumes at 6;
    the two chunks it asks again are free, and one copy is one copy, after three cuts."""
    data = (source / SHARD).read_bytes()
    url = file_url(one_copy)
    have = b""
    for cut_at in (3, 7, 11):  # chunks written before each cut; the client keeps 2 fewer
        start = len(have)
        resume = {"HTTP_RANGE": f"bytes={start}-"} if start else {}
        sent = cut_after(client, url, cut_at - start // CHUNK, REMOTE_ADDR=A, **resume)
        have += sent[: -2 * CHUNK]
    rest = get(client, url, HTTP_RANGE=f"bytes={len(have)}-", REMOTE_ADDR=A)
    assert rest.status_code == 206
    assert have + body(rest) == data
    assert charged() == MIB
    assert forgiven() == 3 * 2 * CHUNK


def test_another_address_pays_for_the_same_bytes(client, one_copy, source, settings):
    settings.WEIGHTS_BUDGET_SLACK_BYTES = 4 * CHUNK
    url = file_url(one_copy)
    assert len(cut_after(client, url, 8, REMOTE_ADDR=A)) == 8 * CHUNK
    # B resumes where A was cut, but re-asks two chunks A was charged for: B pays them.
    rest = get(client, url, HTTP_RANGE=f"bytes={6 * CHUNK}-", REMOTE_ADDR=B)
    assert rest.status_code == 206 and len(body(rest)) == MIB - 6 * CHUNK
    assert (charged(), forgiven()) == (MIB + 2 * CHUNK, 0)
    # The file's slack (4 chunks) is all a third full copy could still get: refused.
    assert get(client, url, REMOTE_ADDR=B).status_code == 429
    assert charged() <= MIB + 4 * CHUNK


def test_two_machines_sharing_a_one_copy_link_get_one_copy_plus_the_slack(
    client,
    one_copy,
    source,
    settings,
):
    settings.WEIGHTS_BUDGET_SLACK_BYTES = CHUNK
    url = file_url(one_copy)
    assert body(get(client, url, REMOTE_ADDR=A)) == (source / SHARD).read_bytes()
    refused = get(client, url, REMOTE_ADDR=B)
    assert refused.status_code == 429
    event = DownloadEvent.objects.order_by("pk").last()
    assert (event.ip_address, event.outcome, event.bytes) == (B, "budget", 0)
    assert charged() == MIB


def test_a_request_that_cannot_finish_within_the_budget_is_refused_before_any_byte(
    client, one_copy, source, settings
):
    """Half a copy to A; then B asks for the whole file: B would need a whole copy with
    half a copy and the slack left, so B is refused up front; B's half fits."""
    settings.WEIGHTS_BUDGET_SLACK_BYTES = 3 * CHUNK
    url = file_url(one_copy)
    half = get(client, url, HTTP_RANGE=f"bytes=0-{MIB // 2 - 1}", REMOTE_ADDR=A)
    assert len(body(half)) == MIB // 2
    assert get(client, url, REMOTE_ADDR=B).status_code == 429
    assert (charged(), forgiven()) == (MIB // 2, 0)
    rest = get(client, url, HTTP_RANGE=f"bytes={MIB // 2}-", REMOTE_ADDR=B)
    assert len(body(rest)) == MIB // 2
    assert (charged(), forgiven()) == (MIB, 0)


def test_a_machine_downloading_again_is_free_up_to_the_cap(client, one_copy, source, settings):
    """aria2c killed before it saved its progress starts again from byte 0: the same
    machine re-asks for bytes it was sent. Free, up to 2 copies' worth per file; then paid."""
    settings.WEIGHTS_BUDGET_SLACK_BYTES = 0
    data = (source / SHARD).read_bytes()
    url = file_url(one_copy)
    for _ in range(3):
        assert body(get(client, url, REMOTE_ADDR=A)) == data
    assert (charged(), forgiven()) == (MIB, 2 * MIB)
    assert get(client, url, REMOTE_ADDR=A).status_code == 429


def test_two_streams_admitted_together_cannot_pass_the_ceiling(
    client, one_copy, source, settings, monkeypatch
):
    """Two machines start at the same moment on a one-copy link: both fit when they start,
    so both are admitted; the one that reaches the ceiling second stops there, and its
    connection is dropped so that its client does not wait for the rest."""
    settings.WEIGHTS_BUDGET_SLACK_BYTES = 2 * CHUNK
    monkeypatch.setattr(budget, "FIRST_STEP", CHUNK)
    monkeypatch.setattr(budget, "CONTINUE_TRIES", 1)
    url = file_url(one_copy)
    first, second = get(client, url, REMOTE_ADDR=A), get(client, url, REMOTE_ADDR=B)
    assert (first.status_code, second.status_code) == (200, 200)
    assert body(first) == (source / SHARD).read_bytes()
    cut = read_until_stopped_data(second)
    assert 0 < sum(len(c) for c in cut) <= 2 * CHUNK
    assert charged() == MIB + sum(len(c) for c in cut) <= MIB + 2 * CHUNK
    stopped = DownloadEvent.objects.order_by("pk").last()
    assert (stopped.ip_address, stopped.outcome) == (B, "budget")


def test_authorised_ranges_are_free_again_to_the_same_address_up_to_the_cap(
    client, one_copy, settings
):
    """X-Accel (and S3): the portal cannot see what arrived, so a re-request of an
    authorised range from the same address is free, up to 2 copies' worth per file.
    (Django answers 200 with X-Accel-Redirect; nginx turns a Range into the 206.)"""
    settings.WEIGHTS_X_ACCEL_PREFIX = "/_weights/"
    settings.WEIGHTS_BUDGET_SLACK_BYTES = 0
    url = file_url(one_copy)
    assert get(client, url, REMOTE_ADDR=A).status_code == 200  # 1 copy authorised
    for start in (MIB // 4, MIB // 2, 3 * MIB // 4):  # three cuts, three resumes
        assert get(client, url, HTTP_RANGE=f"bytes={start}-", REMOTE_ADDR=A).status_code == 200
    assert (charged(), forgiven()) == (MIB, MIB // 4 * 3 + MIB // 2 + MIB // 4 * 1)
    assert get(client, url, REMOTE_ADDR=B).status_code == 429  # another address pays
    # The cap: 2 copies' worth free in all; then the same address pays too.
    assert get(client, url, HTTP_RANGE=f"bytes=0-{MIB // 2 - 1}", REMOTE_ADDR=A).status_code == 200
    assert get(client, url, REMOTE_ADDR=A).status_code == 429
    assert (charged(), forgiven()) == (MIB, 2 * MIB)


def test_aria2_style_parallel_segments_after_a_whole_file_request(client, one_copy, settings):
    """aria2c -x16 first asks for the whole file, then for 15 segments: authorised, the
    segments re-ask bytes the first request was charged for, so all 16 fit in one copy."""
    settings.WEIGHTS_X_ACCEL_PREFIX = "/_weights/"
    url = file_url(one_copy)
    assert get(client, url, REMOTE_ADDR=A).status_code == 200
    step = MIB // 16
    for i in range(1, 16):
        ranged = get(
            client, url, HTTP_RANGE=f"bytes={i * step}-{(i + 1) * step - 1}", REMOTE_ADDR=A
        )
        assert ranged.status_code == 200
    assert charged() == MIB


def test_a_lost_cache_costs_the_free_re_request_never_more_bytes(client, one_copy, settings):
    settings.WEIGHTS_X_ACCEL_PREFIX = "/_weights/"
    settings.WEIGHTS_BUDGET_SLACK_BYTES = 0
    url = file_url(one_copy)
    assert get(client, url, HTTP_RANGE=f"bytes=0-{MIB // 2 - 1}", REMOTE_ADDR=A).status_code == 200
    cache.clear()
    assert get(client, url, HTTP_RANGE="bytes=0-99", REMOTE_ADDR=A).status_code == 200
    assert (charged(), forgiven()) == (MIB // 2 + 100, 0)


@pytest.mark.django_db(transaction=True)
def test_sixteen_parallel_whole_file_requests_never_exceed_the_ceiling(one_copy, settings):
    """Sixteen machines at once on a one-copy link: conditional UPDATEs keep the total at
    one copy plus the slack, whatever the interleaving."""
    settings.WEIGHTS_BUDGET_SLACK_BYTES = 2 * CHUNK
    received: list[int] = []
    lock = threading.Lock()

    def fetch(i: int) -> None:
        try:
            response = Client().get(file_url(one_copy), REMOTE_ADDR=f"192.0.2.{i + 1}")
            n = len(body(response)) if response.status_code == 200 else 0
            with lock:
                received.append(n)
        finally:
            connection.close()

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(received) == 16
    assert MIB <= sum(received) <= MIB + 2 * CHUNK
    assert charged() == sum(received)


RULE = (
    "Bytes count once per machine: a resume, a retry or a parallel download from the same "
    "address does not pay again for bytes this link already counted for it in the last "
    "24 hours; another machine always pays."
)


def test_the_rule_is_one_sentence_on_the_landing_page_and_in_the_docs(client, one_copy):
    page = " ".join(client.get(f"/d/{one_copy}/").content.decode().split())
    assert RULE in page
    docs = (Path(__file__).resolve().parents[2] / "docs" / "downloads.md").read_text()
    assert RULE in " ".join(docs.replace("> ", "").split())


def test_s3_resumes_from_the_same_address_are_free_and_another_address_pays(
    client, s3_storage, releases, grant, tmp_path, settings
):
    """S3: each request is a fresh presigned URL for the range asked; a resume after a
    cut re-authorises bytes this address already had authorised, so it costs nothing."""
    settings.WEIGHTS_BUDGET_SLACK_BYTES = 0
    publish(tmp_path, "llama-7b", "7B", seed=1)
    url = file_url(links.link_issue(grant=grant, budget_copies=1).token)
    assert get(client, url, REMOTE_ADDR=A).status_code == 302
    for start in (MIB // 3, 2 * MIB // 3):
        resumed = get(client, url, HTTP_RANGE=f"bytes={start}-", REMOTE_ADDR=A)
        assert resumed.status_code == 302 and "range" in resumed["Location"].lower()
    assert (charged(), forgiven()) == (MIB, MIB - MIB // 3 + MIB - 2 * MIB // 3)
    refused = get(client, url, HTTP_RANGE=f"bytes={MIB // 2}-", REMOTE_ADDR=B)
    assert refused.status_code == 429 and "Location" not in refused
    assert charged() == MIB


def test_overlap_counts_each_covered_byte_once_and_never_less_than_zero():
    """Spans after, before, inside and across the one measured (aria2c's segments are
    spans wholly after the first request's)."""
    import random

    assert budget.overlap((0, 100), [(200, 300)]) == 0
    assert budget.overlap((200, 300), [(0, 100)]) == 0
    rng = random.Random(10)
    for _ in range(2000):
        start = rng.randrange(0, 500)
        span = (start, start + rng.randrange(0, 300))
        spans = []
        for _ in range(rng.randrange(0, 6)):
            s = rng.randrange(0, 900)
            spans.append((s, s + rng.randrange(0, 200)))
        covered = {b for s, e in spans for b in range(s, e)}
        assert budget.overlap(span, spans) == len(covered & set(range(*span)))
