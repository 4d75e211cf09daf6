"""Services mode end to end: a real Celery worker on the demo queue, the real Redis."""

from __future__ import annotations

import threading
import time

import pytest
from django.test import override_settings
from django.utils import timezone

from inference_demo import heartbeat, runtime, transport
from inference_demo.models import DemoRequest
from portal.celery import app as celery_app
from tests.inference_demo.test_runner import SLUG, kinds, make_request, text_of, wait_until

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

WAIT_S = 2


def _reset_pools() -> None:
    """Drop cached broker connections so a changed broker_url takes effect."""
    from kombu import pools

    pools.reset()
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


def _clean(client) -> None:
    keys = list(client.scan_iter(match="demo:*"))
    client.delete("demo", *keys)  # "demo": the Celery queue, so no stale task survives a test


@pytest.fixture
def services_mode(redis_url, demo_dir):
    saved = {key: celery_app.conf[key] for key in ("task_always_eager", "broker_url")}
    celery_app.conf.update(task_always_eager=False, broker_url=redis_url)
    _reset_pools()
    with override_settings(
        DEMO_TRANSPORT="redis",
        REDIS_URL=redis_url,
        DEMO_DEVICE="cpu",
        DEMO_WORKER_WAIT_S=WAIT_S,
        DEMO_ENGINE={"max_batch_size": 4, "max_queue": 8, "max_seq_len": 256},
    ):
        client = transport.redis_client()
        _clean(client)
        runtime.reset()
        try:
            yield client
        finally:
            celery_app.conf.update(saved)
            _reset_pools()
            runtime.reset()
            _clean(client)


@pytest.fixture
def demo_worker(services_mode):
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        celery_app,
        pool="threads",
        concurrency=4,
        queues=["demo"],
        perform_ping_check=False,
        shutdown_timeout=20,
    ) as worker:
        yield worker
    # `celery worker` sends worker_shutdown on a warm shutdown; the embedded one does not.
    heartbeat.stop_heartbeat(sender=worker)
    assert not services_mode.exists(transport.worker_key(worker.hostname))


def stamped(stream) -> list[tuple[float, dict]]:
    return [(timezone.now().timestamp(), event) for event in stream]


def test_streams_deltas_through_a_real_worker_before_generation_ends(demo_worker):
    assert transport.demo_available(SLUG)
    row = make_request(max_new_tokens=120)
    received = stamped(transport.stream_request(row))
    events = [event for _, event in received]

    assert kinds(events)[:2] == ["queued", "started"] and events[-1]["event"] == "done"
    assert set(kinds(events[2:-1])) == {"delta"}
    row.refresh_from_db()
    assert row.status == "done" and row.tokens_out == events[-1]["tokens_out"] > 0
    assert row.started_at and row.ttft_ms is not None and row.duration_ms is not None
    # The page saw text while the worker was still generating.
    first_delta_at = next(at for at, event in received if event["event"] == "delta")
    assert first_delta_at < row.finished_at.timestamp()
    assert len([e for e in events if e["event"] == "delta"]) > 1

    # Greedy through the worker equals greedy in-process, on the same engine settings.
    from inference_demo import runner

    local = list(runner.run(make_request(max_new_tokens=120).pk))
    assert text_of(events) == text_of(local)


def test_one_worker_process_serves_concurrent_requests(demo_worker):
    rows = [
        make_request(f"Request {i} about the for statement", max_new_tokens=24) for i in range(4)
    ]
    results: dict[int, list[dict]] = {}

    def consume(row: DemoRequest) -> None:
        results[row.pk] = list(transport.stream_request(row))

    threads = [threading.Thread(target=consume, args=(row,)) for row in rows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(results[row.pk][-1]["event"] == "done" for row in rows), results
    assert set(DemoRequest.objects.values_list("status", flat=True)) == {"done"}


def test_stop_button_cancels_on_the_worker(demo_worker):
    row = make_request(max_new_tokens=250)
    events = []
    for event in transport.stream_request(row):
        events.append(event)
        if event["event"] == "delta" and len(events) == 3:
            transport.cancel_request(row.pk)  # as the Stop button does, from any web process
    assert events[-1]["event"] == "error" and events[-1]["code"] == "cancelled"
    row.refresh_from_db()
    assert row.status == "cancelled" and row.tokens_out < 250
    wait_until(lambda: runtime.get_engine(SLUG).active == 0, timeout=2)


def test_client_disconnect_cancels_on_the_worker(demo_worker):
    row = make_request(max_new_tokens=250)
    stream = transport.stream_request(row)
    while next(stream)["event"] != "delta":
        pass
    stream.close()  # the SSE client went away

    def ended() -> bool:
        row.refresh_from_db()
        return row.status == "cancelled"

    wait_until(ended, timeout=5)
    assert row.tokens_out < 250
    wait_until(lambda: runtime.get_engine(SLUG).active == 0, timeout=2)
    after = make_request(max_new_tokens=8)
    assert list(transport.stream_request(after))[-1]["event"] == "done"


def test_worker_down_is_unavailable_quickly_and_a_late_worker_drops_the_request(services_mode):
    assert not transport.demo_available(SLUG)
    row = make_request()
    started = time.monotonic()
    events = list(transport.stream_request(row))
    elapsed = time.monotonic() - started

    assert [e["code"] for e in events] == ["unavailable"]
    assert "no demo worker answered" in events[0]["message"]
    assert WAIT_S - 0.1 <= elapsed < WAIT_S + 1
    row.refresh_from_db()
    assert row.status == "failed" and row.error.startswith("unavailable: ")

    # A worker that comes up later takes the task from the queue and does not run it.
    from celery.contrib.testing.worker import start_worker

    with start_worker(
        celery_app, pool="threads", concurrency=2, queues=["demo"], perform_ping_check=False
    ) as late:
        wait_until(lambda: services_mode.xlen(transport.stream_key(row.pk)) >= 2, timeout=10)
    heartbeat.stop_heartbeat(sender=late)
    row.refresh_from_db()
    assert row.status == "failed" and row.tokens_out == 0 and row.started_at is None
