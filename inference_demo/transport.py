"""How demo events travel from the engine to the web process that streams them.

Two transports, chosen by ``settings.DEMO_TRANSPORT``, one generation loop
(``runner.run``) above both:

* ``inprocess`` (embedded mode): the web process runs the loop itself, on the engine
  ``runtime.get_engine`` loaded into this process.
* ``redis`` (services mode): the web process enqueues ``tasks.run_demo_request`` on
  the Celery queue ``demo``; the demo worker runs the loop and appends every event to
  the Redis stream ``demo:stream:<id>`` (XADD, capped by MAXLEN, expiring after
  ``KEY_TTL_S``); the web side reads it with blocking XREADs of at most 0.5 s and
  relays the events. A worker that does not answer within ``DEMO_WORKER_WAIT_S`` makes
  the request fail as "unavailable"; demo workers announce themselves with a
  heartbeat key (``heartbeat.py``) that ``demo_available`` looks for.

Stopping works the same in both, whichever web process receives the Stop: it is
recorded on the row (``services.demo_request_cancel``), which the generating process
reads every ``runner.CANCEL_POLL_S``; a local event (in-process) or the Redis key
``demo:cancel:<id>``, which the worker checks between deltas, only make it quicker,
and the web side of the stream also uses that key to stop a worker when its client
goes away or the stream times out.

The public API, used by the demo page and the API::

    stream_request(demo_request) -> Iterator[dict]   # events as documented in runner.py
    cancel_request(request_id) -> None              # the Stop button
    demo_available(slug) -> bool                    # say "unavailable" at once

Closing the iterator of ``stream_request`` early (the client disconnected) cancels
the request: its engine slot is freed within one decode step and the row ends
cancelled. No torch here: the web process imports this module.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from django.conf import settings

from inference_demo import runner, runtime, services
from inference_demo.models import DemoRequest

log = logging.getLogger(__name__)

Event = dict[str, Any]

STREAM_PREFIX = "demo:stream:"
CANCEL_PREFIX = "demo:cancel:"
WORKER_PREFIX = "demo:worker:"
KEY_TTL_S = 600  # stream and cancel keys outlive any request, then Redis drops them
STREAM_MAXLEN = 5000  # events kept per request stream (a request has max_new_tokens + a few)
READ_BLOCK_MS = 500  # one blocking XREAD at most
STALL_S = 15.0  # silence after a worker took the request, before asking whether it still lives
STREAM_MAX_S = 600.0  # no request streams longer than this
CANCEL_CHECK_S = 0.1  # the worker asks Redis for a Stop at most this often between deltas

TERMINAL = frozenset({"done", "error"})
INTERNAL = frozenset({"accepted"})  # worker to web only; never relayed
ACCEPTED: Event = {"event": "accepted"}

MSG_NO_WORKER = (
    "The demo is unavailable right now: no demo worker answered within {n} s. Try again later."
)
MSG_WORKER_LOST = "The demo worker stopped responding; try again."
MSG_TIMED_OUT = "The request took too long and was stopped."


def stream_key(request_id: int) -> str:
    return f"{STREAM_PREFIX}{request_id}"


def cancel_key(request_id: int) -> str:
    return f"{CANCEL_PREFIX}{request_id}"


def worker_key(hostname: str) -> str:
    return f"{WORKER_PREFIX}{hostname}"


# --- Public API -------------------------------------------------------------------


def stream_request(demo_request: DemoRequest) -> Iterator[Event]:
    """Generate for an already-created DemoRequest; yields events until the terminal one."""
    if settings.DEMO_TRANSPORT == "redis":
        return _stream_redis(demo_request.pk)
    return _stream_inprocess(demo_request.pk)


def cancel_request(request_id: int) -> None:
    """Stop a request wherever it runs (the Stop button); idempotent."""
    if settings.DEMO_TRANSPORT == "redis":
        from redis.exceptions import RedisError

        try:
            redis_client().set(cancel_key(request_id), "1", ex=KEY_TTL_S)
        except RedisError as exc:  # the worker still reads the Stop from the row
            log.warning("demo request %s: no cancel key in Redis: %r", request_id, exc)
    else:
        with _local_lock:
            event = _local_cancels.get(request_id)
        if event is not None:  # streaming in this process: stop at the next delta
            event.set()
    services.demo_request_cancel(request_id=request_id)


def demo_available(slug: str) -> bool:
    """Quick check for the page: can a request for this demo be served right now?"""
    if settings.DEMO_TRANSPORT == "redis":
        try:
            return any(slug in worker.get("slugs", ()) for worker in live_workers())
        except Exception:  # Redis down: the demo is unavailable, the page still renders
            log.warning("demo availability check failed", exc_info=True)
            return False
    return runtime.is_available(slug)


# --- In-process -------------------------------------------------------------------

_local_cancels: dict[int, threading.Event] = {}
_local_lock = threading.Lock()


def _local_cancel_event(request_id: int) -> threading.Event:
    with _local_lock:
        return _local_cancels.setdefault(request_id, threading.Event())


def _stream_inprocess(request_id: int) -> Iterator[Event]:
    cancelled = _local_cancel_event(request_id)
    try:
        yield from runner.run(request_id, should_cancel=cancelled.is_set)
    finally:
        with _local_lock:
            _local_cancels.pop(request_id, None)


# --- Redis ------------------------------------------------------------------------

_clients: dict[str, Any] = {}


def redis_client() -> Any:
    """A client for ``settings.REDIS_URL``, one connection pool per URL and process."""
    url = settings.REDIS_URL
    if not url:
        raise RuntimeError("DEMO_TRANSPORT is redis but REDIS_URL is not set")
    client = _clients.get(url)
    if client is None:
        import redis

        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=READ_BLOCK_MS / 1000 + 5,
            health_check_interval=30,
        )
        _clients[url] = client
    return client


def live_workers() -> list[dict[str, Any]]:
    """Heartbeats of the demo workers alive now (each key expires unless refreshed)."""
    client = redis_client()
    keys = list(client.scan_iter(match=f"{WORKER_PREFIX}*", count=100))
    workers = []
    for raw in client.mget(keys) if keys else []:
        if raw:
            try:
                workers.append(json.loads(raw))
            except ValueError:
                continue
    return workers


class RedisSink:
    """The demo worker's end: append events to the request's stream, watch for a Stop."""

    def __init__(self, request_id: int, client: Any = None) -> None:
        self.request_id = request_id
        self.client = client or redis_client()
        self.stream = stream_key(request_id)
        self.cancel = cancel_key(request_id)
        self._cancelled = False
        self._checked_at = time.monotonic()

    def publish(self, event: Event) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(
            self.stream,
            {"e": json.dumps(event, separators=(",", ":"))},
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )
        pipe.expire(self.stream, KEY_TTL_S)
        pipe.exists(self.cancel)
        *_, exists = pipe.execute()
        self._checked_at = time.monotonic()
        self._cancelled = self._cancelled or bool(exists)

    def cancel_requested(self) -> bool:
        if not self._cancelled and time.monotonic() - self._checked_at >= CANCEL_CHECK_S:
            self._cancelled = bool(self.client.exists(self.cancel))
            self._checked_at = time.monotonic()
        return self._cancelled


def _enqueue(request_id: int) -> None:
    from inference_demo.tasks import run_demo_request

    # A task no worker took in time is dropped by the worker (the row has failed anyway).
    expires = max(60, 10 * settings.DEMO_WORKER_WAIT_S)  # seconds
    run_demo_request.apply_async(args=[request_id], expires=expires)


def _stream_redis(request_id: int) -> Iterator[Event]:
    from redis.exceptions import RedisError

    wait_s = settings.DEMO_WORKER_WAIT_S
    unavailable = runner.MSG_UNAVAILABLE
    try:
        client = redis_client()
        # Ids are never reused in production; in tests a stale stream must not be replayed.
        client.delete(stream_key(request_id), cancel_key(request_id))
        _enqueue(request_id)
    except Exception as exc:
        log.warning("demo request %s could not be enqueued: %r", request_id, exc)
        yield runner.record_failure(
            request_id, "unavailable", unavailable, detail=f"enqueue failed: {exc!r}"
        )
        return

    started = time.monotonic()
    worker_deadline = started + wait_s
    last_id = "0-0"
    accepted = finished = False
    heard_at = started
    try:
        while True:
            now = time.monotonic()
            if not accepted:
                stopped = client.exists(cancel_key(request_id)) or services.demo_cancel_requested(
                    request_id=request_id
                )
                if stopped:  # Stop before any worker took it
                    finished = True
                    yield runner.record_failure(request_id, "cancelled", runner.MSG_CANCELLED)
                    return
                if now >= worker_deadline:
                    finished = True
                    client.set(cancel_key(request_id), "1", ex=KEY_TTL_S)
                    yield runner.record_failure(
                        request_id,
                        "unavailable",
                        MSG_NO_WORKER.format(n=wait_s),
                        detail=f"no demo worker answered within {wait_s} s",
                    )
                    return
                block_ms = max(1, min(READ_BLOCK_MS, int((worker_deadline - now) * 1000)))
            else:
                if now - heard_at > STALL_S and not live_workers():
                    finished = True
                    yield runner.record_failure(
                        request_id, "unavailable", MSG_WORKER_LOST, detail="demo worker lost"
                    )
                    return
                if now - started > STREAM_MAX_S:
                    finished = True
                    client.set(cancel_key(request_id), "1", ex=KEY_TTL_S)
                    yield runner.record_failure(
                        request_id, "model_error", MSG_TIMED_OUT, detail="stream timed out"
                    )
                    return
                block_ms = READ_BLOCK_MS
            response = client.xread({stream_key(request_id): last_id}, count=512, block=block_ms)
            for _stream, entries in response or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    accepted, heard_at = True, time.monotonic()
                    event = json.loads(fields["e"])
                    if event.get("event") in INTERNAL:
                        continue
                    finished = event.get("event") in TERMINAL
                    yield event
                    if finished:
                        return
    except RedisError as exc:
        finished = True
        log.warning("demo request %s lost its Redis stream: %r", request_id, exc)
        yield runner.record_failure(
            request_id, "unavailable", unavailable, detail=f"redis error: {exc!r}"
        )
    finally:
        if not finished:  # the client went away: stop the worker, free the slot
            try:
                client.set(cancel_key(request_id), "1", ex=KEY_TTL_S)
            except RedisError:
                log.warning("demo request %s: could not signal cancellation", request_id)
            if not accepted:  # no worker has it yet; one that takes it later drops it
                runner.record_failure(request_id, "cancelled", runner.MSG_CANCELLED)
