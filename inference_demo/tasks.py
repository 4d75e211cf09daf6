"""Celery tasks of the hosted demo: take ids, call the runner or the services.

Starting a demo worker (services mode, next to the web and the other workers)::

    celery -A portal worker -Q demo --pool threads --concurrency 16 -n demo@%h

Why a threads pool with many threads: the engine batches concurrent requests
itself, so a worker process loads each demo model once (``runtime.get_engine``, on
CUDA when present, ``DEMO_DEVICE``) and every task thread submits to that one
engine; a task thread mostly waits for deltas and publishes them to Redis, while
the engine's own thread does the work with the GIL released. ``--pool solo``
would run one request at a time, so nothing would ever batch; ``prefork`` would
load a copy of the model per child. Make ``--concurrency`` at least the engine's
``max_batch_size`` (``DEMO_ENGINE``, 16 by default) so every batch slot can be
filled; further requests wait in the engine's queue (their page shows the queue
position) or are answered "busy" once that is full. Run one such worker per GPU
(``CUDA_VISIBLE_DEVICES``). The threads pool does not enforce task time limits;
``max_new_tokens`` caps every request, and the web side stops waiting after
``transport.STREAM_MAX_S``.
"""

from __future__ import annotations

import logging

from celery import shared_task

from inference_demo import (
    heartbeat,  # noqa: F401  (connects the worker heartbeat)
    runner,
    services,
    transport,
)

log = logging.getLogger(__name__)


@shared_task(name="inference_demo.tasks.run_demo_request", ignore_result=True)
def run_demo_request(request_id: int) -> str:
    """Generate for one DemoRequest, streaming events to Redis; returns how it ended.

    Not acknowledged late and not retried: a request whose worker died is not
    replayed to a browser that has given up. A second delivery finds the row no
    longer queued and does nothing.
    """
    sink = transport.RedisSink(request_id)
    sink.publish(transport.ACCEPTED)
    outcome = ""
    events = runner.run(request_id, should_cancel=sink.cancel_requested)
    try:
        for event in events:
            sink.publish(event)
            outcome = event.get("code") or event["event"]
    finally:
        events.close()  # a publish that failed cancels the generation and frees the slot
    return outcome


@shared_task(name="inference_demo.tasks.purge_demo_requests")
def purge_demo_requests() -> int:
    return services.demo_requests_purge()
