"""The transport API the demo page and API use: stream_request, cancel_request, demo_available."""

from __future__ import annotations

import json
import threading
import time

import pytest
from django.test import override_settings

from inference_demo import runner, runtime, transport
from tests.inference_demo.test_runner import (
    PROMPT,
    SLUG,
    kinds,
    make_request,
    text_of,
    wait_until,
)


@pytest.fixture
def inprocess(demo_dir):
    runtime.reset()
    with override_settings(DEMO_TRANSPORT="inprocess", DEMO_DEVICE="cpu"):
        yield
    runtime.reset()


@pytest.fixture
def redis_transport(redis_url):
    with override_settings(DEMO_TRANSPORT="redis", REDIS_URL=redis_url, DEMO_WORKER_WAIT_S=1):
        client = transport.redis_client()
        keys = list(client.scan_iter(match="demo:*"))
        if keys:
            client.delete(*keys)
        yield client
        keys = list(client.scan_iter(match="demo:*"))
        if keys:
            client.delete(*keys)


@pytest.mark.django_db
def test_inprocess_stream_yields_queued_started_deltas_done(inprocess):
    row = make_request(max_new_tokens=20)
    events = list(transport.stream_request(row))
    assert kinds(events)[:2] == ["queued", "started"] and events[-1]["event"] == "done"
    assert set(kinds(events[2:-1])) == {"delta"}
    from inference_demo.llama.generation import SamplingParams

    expected = runtime.get_engine(SLUG).submit(PROMPT, SamplingParams(max_new_tokens=20)).result()
    assert text_of(events) == expected.text
    assert json.loads(json.dumps(events)) == events  # what the SSE view writes
    row.refresh_from_db()
    assert row.status == "done" and row.tokens_out == events[-1]["tokens_out"] > 0
    assert row.ttft_ms is not None and row.duration_ms is not None


@pytest.mark.django_db
def test_inprocess_close_cancels(inprocess):
    row = make_request(max_new_tokens=200)
    stream = transport.stream_request(row)
    assert next(stream)["event"] == "queued"
    while next(stream)["event"] != "delta":
        pass
    stream.close()
    row.refresh_from_db()
    assert row.status == "cancelled" and 0 < row.tokens_out < 200
    wait_until(lambda: runtime.get_engine(SLUG).active == 0, timeout=2)
    assert list(transport.stream_request(make_request()))[-1]["event"] == "done"


@pytest.mark.django_db
def test_inprocess_stop_button_from_another_thread(inprocess):
    row = make_request(max_new_tokens=200)
    events = []
    for event in transport.stream_request(row):
        events.append(event)
        if event["event"] == "delta" and len(events) == 3:
            threading.Thread(target=transport.cancel_request, args=(row.pk,)).start()
    assert events[-1]["code"] == "cancelled"
    row.refresh_from_db()
    assert row.status == "cancelled" and row.tokens_out < 200
    assert transport._local_cancels == {}


@pytest.mark.django_db
def test_inprocess_demo_available_follows_the_model_dir(inprocess, tmp_path):
    assert transport.demo_available(SLUG) is True
    assert transport.demo_available("llama-65b") is False
    with override_settings(DEMO_MODELS={SLUG: tmp_path}):
        assert transport.demo_available(SLUG) is False


def test_demo_tasks_are_routed_to_the_demo_queue():
    from portal.celery import app

    route = app.amqp.router.route({}, "inference_demo.tasks.run_demo_request")
    assert route["queue"].name == "demo"


@pytest.mark.django_db
def test_purge_task_deletes_old_records():
    from datetime import timedelta

    from django.utils import timezone

    from inference_demo.tasks import purge_demo_requests

    old = make_request()
    old.created_at = timezone.now() - timedelta(days=400)
    old.save()
    make_request()
    assert purge_demo_requests.delay().get() == 1


def test_transport_modules_do_not_import_torch():
    import subprocess
    import sys

    script = (
        "import sys, django; django.setup();"
        "import inference_demo.transport, inference_demo.runner, inference_demo.tasks;"
        "import inference_demo.runtime, inference_demo.heartbeat;"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "PATH": "/usr/bin:/bin",
            "PORTAL_VAR_DIR": "/tmp/portal-notorch",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]


@pytest.mark.services
def test_redis_demo_available_reads_worker_heartbeats(redis_transport):
    assert transport.demo_available(SLUG) is False
    redis_transport.set(transport.worker_key("demo@test"), json.dumps({"slugs": [SLUG]}), ex=5)
    assert transport.demo_available(SLUG) is True
    assert transport.demo_available("llama-65b") is False


@pytest.mark.services
@pytest.mark.django_db
def test_redis_stop_before_any_worker_answers(redis_transport, monkeypatch):
    monkeypatch.setattr(transport, "_enqueue", lambda request_id: None)  # nobody takes it
    row = make_request()
    threading.Timer(0.2, transport.cancel_request, args=(row.pk,)).start()
    started = time.monotonic()
    events = list(transport.stream_request(row))
    assert events == [{"event": "error", "code": "cancelled", "message": runner.MSG_CANCELLED}]
    assert time.monotonic() - started < 0.9  # before DEMO_WORKER_WAIT_S (1 s) ran out
    row.refresh_from_db()
    assert row.status == "cancelled"


@pytest.mark.services
@pytest.mark.django_db
def test_redis_enqueue_failure_is_unavailable_at_once(redis_transport):
    from unittest import mock

    row = make_request()
    with mock.patch.object(transport, "_enqueue", side_effect=ConnectionError("broker down")):
        events = list(transport.stream_request(row))
    assert [e["code"] for e in events] == ["unavailable"]
    row.refresh_from_db()
    assert row.status == "failed" and "broker down" in row.error
