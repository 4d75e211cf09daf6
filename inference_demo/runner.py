"""The generation loop of the hosted demo, the one code path above the transport.

``run(request_id)`` takes a queued DemoRequest, submits it to this process's engine
(``runtime.get_engine``: the built-in engine, or the client of the OpenAI-compatible
server configured for the release), yields the events the browser sees and records the
outcome through the services. The in-process transport iterates it in the web process; the
Celery task ``tasks.run_demo_request`` iterates it in the demo worker and publishes
every event to Redis.

Events (JSON-serialisable dicts), in order::

    {"event": "queued", "position": 1}            # first; again when the position changes
    {"event": "started"}                          # the engine admitted the request
    {"event": "delta", "text": "..."}             # many
    {"event": "done", "finish_reason": "stop"|"length", "tokens_in": int,
     "tokens_out": int, "ttft_ms": int, "tokens_per_s": float, "duration_ms": int}
  | {"event": "error", "code": "busy"|"prompt_too_long"|"model_error"|"unavailable"|
     "cancelled", "message": str}                # exactly one terminal event

Cancelling: a Stop reaches the run from whichever process received it, through the
row (``services.demo_request_cancel``), which the run reads at most every
``CANCEL_POLL_S``; the transport's own ``should_cancel`` (a local event, a Redis key)
is polled between deltas and while waiting as the quicker path. When either turns true
the engine request is cancelled (it frees its slot within one decode step) and the run
ends with the "cancelled" error. Closing the generator early (the client went away)
does the same without the final event. Either way the row ends cancelled.

No torch at import time: the web process imports this module.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from inference_demo import runtime, services
from inference_demo.models import DemoRequest

log = logging.getLogger(__name__)

Status = DemoRequest.Status
Event = dict[str, Any]

POLL_S = 0.1  # how often a waiting run checks cancellation and its queue position
QUEUED_EVERY_S = 0.5  # at most this often a changed queue position is reported
DRAIN_S = 5.0  # how long a cancelled run waits for the engine to release the slot
CANCEL_POLL_S = 0.2  # how often a run asks the database whether a Stop was recorded

MSG_BUSY = "The demo is busy right now; try again in a minute."
MSG_PROMPT_TOO_LONG = "The prompt is too long for this model: {detail}."
MSG_MODEL_ERROR = "The model failed on this request; try again."
MSG_OOM = "The model ran out of memory on this request; try a shorter prompt or fewer new tokens."
MSG_UNAVAILABLE = "The demo is unavailable right now; try again later."
MSG_CANCELLED = "Stopped."
MSG_ENDED = "This request has already ended."


def error_event(code: str, message: str) -> Event:
    return {"event": "error", "code": code, "message": message}


def record_failure(request_id: int, code: str, message: str, detail: str = "") -> Event:
    """Record a request that ends without a completion; returns its terminal event."""
    cancelled = code == "cancelled"
    services.demo_request_finished(
        request_id=request_id,
        status=Status.CANCELLED if cancelled else Status.FAILED,
        finish_reason="cancelled" if cancelled else "",
        error="" if cancelled else f"{code}: {detail or message}",
    )
    return error_event(code, message)


def classify(exc: BaseException) -> tuple[str, str]:
    """Map an exception from loading, submitting or generating to (code, message)."""
    if isinstance(exc, runtime.ModelUnavailable):
        return "unavailable", MSG_UNAVAILABLE
    from inference_demo import openai_backend as remote  # before torch: it needs none

    if isinstance(exc, remote.BackendBusy):
        return "busy", MSG_BUSY
    if isinstance(exc, remote.BackendRefused) and exc.context_exceeded:
        return "prompt_too_long", MSG_PROMPT_TOO_LONG.format(detail=exc)
    if isinstance(exc, remote.BackendRefused | remote.BackendFailed):
        return "model_error", MSG_MODEL_ERROR
    from inference_demo.llama.engine import QueueFull
    from inference_demo.llama.generation import PromptTooLong

    if isinstance(exc, QueueFull):
        return "busy", MSG_BUSY
    if isinstance(exc, PromptTooLong):
        return "prompt_too_long", MSG_PROMPT_TOO_LONG.format(detail=exc)
    if runtime.is_out_of_memory(exc):
        return "model_error", MSG_OOM
    return "model_error", MSG_MODEL_ERROR


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _never() -> bool:
    return False


class CancelWatch:
    """Whether a Stop reached this request: the transport's signal, or the recorded row."""

    def __init__(self, request_id: int, signal: Callable[[], bool] | None = None) -> None:
        self.request_id = request_id
        self.signal = signal or _never
        self.seen = False
        self._asked_at: float | None = None

    def __call__(self) -> bool:
        if self.seen:
            return True
        if self.signal():
            self.seen = True
        elif self._asked_at is None or time.monotonic() - self._asked_at >= CANCEL_POLL_S:
            self._asked_at = time.monotonic()
            self.seen = services.demo_cancel_requested(request_id=self.request_id)
        return self.seen


class _Pump(threading.Thread):
    """Iterates one engine request into a queue, so the run can poll while it waits."""

    def __init__(self, request: Any) -> None:
        super().__init__(name=f"demo-pump-{request.id}", daemon=True)
        self.request = request
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def run(self) -> None:
        try:
            for delta in self.request:
                self.items.put(("delta", delta))
            self.items.put(("end", self.request.completion))
        except BaseException as exc:  # handed to the run, which reports it
            self.items.put(("error", exc))

    def wait_end(self, timeout: float) -> Any:
        """The completion (or None) once the engine has let go of the request."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                kind, value = self.items.get(timeout=left)
            except queue.Empty:
                break
            if kind == "end":
                return value
            if kind == "error":
                return None
        return None


def _demo_params(row: DemoRequest) -> services.DemoParams:
    known = services.DemoParams.__dataclass_fields__
    values = {k: v for k, v in row.params.items() if k in known}
    values["stop"] = tuple(values.get("stop", ()))
    return services.DemoParams(**values)


def _sampling_params(params: services.DemoParams) -> Any:
    from inference_demo.llama.generation import SamplingParams

    return SamplingParams(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=params.stop,
    )


def _submit(slug: str, row: DemoRequest) -> tuple[Any, Any]:
    """Submit to this process's engine; an engine that died meanwhile is replaced once."""
    from inference_demo.openai_backend import OpenAIBackend

    params = _demo_params(row)
    engine = runtime.get_engine(slug)
    if isinstance(engine, OpenAIBackend):  # the server samples; it takes the demo's params
        return engine, engine.submit(row.prompt, params)
    from inference_demo.llama.engine import EngineStopped

    sampling = _sampling_params(params)
    for attempt in range(2):
        try:
            return engine, engine.submit(row.prompt, sampling)
        except EngineStopped:
            runtime.discard_engine(slug, engine)
            if attempt:
                raise
            engine = runtime.get_engine(slug)
    raise AssertionError("unreachable")


def _counts(completion: Any) -> dict[str, Any]:
    if completion is None:
        return {}
    t = completion.timings
    return {
        "tokens_in": t.prompt_tokens,
        "tokens_out": t.generated_tokens,
        "ttft_ms": _ms(t.ttft_s) if t.ttft_s else None,
        "duration_ms": _ms(t.total_s),
    }


def run(request_id: int, *, should_cancel: Callable[[], bool] | None = None) -> Iterator[Event]:
    """Generate for one queued DemoRequest; yields events, records the outcome."""
    cancel_requested = CancelWatch(request_id, should_cancel)
    row = DemoRequest.objects.select_related("release").filter(pk=request_id).first()
    if row is None:
        yield error_event("model_error", "No such demo request.")
        return
    if row.status != Status.QUEUED:  # ended elsewhere: cancelled, timed out, or run twice
        yield error_event("cancelled", MSG_ENDED)
        return
    if cancel_requested():
        yield record_failure(request_id, "cancelled", MSG_CANCELLED)
        return
    slug = row.release.slug
    try:
        engine, request = _submit(slug, row)
    except Exception as exc:
        code, message = classify(exc)
        if code == "model_error":
            log.exception("demo request %s: the %s engine failed to start it", request_id, slug)
        yield record_failure(request_id, code, message, detail=f"{type(exc).__name__}: {exc}")
        return
    yield from _relay(request_id, slug, engine, request, cancel_requested)


def _relay(
    request_id: int,
    slug: str,
    engine: Any,
    request: Any,
    cancel_requested: Callable[[], bool],
) -> Iterator[Event]:
    pump = _Pump(request)
    pump.start()
    finished = started = stopping = aborted = False
    completion: Any = None
    failure: BaseException | None = None

    def stop() -> None:
        nonlocal stopping
        stopping = True
        request.cancel()

    def start() -> Iterator[Event]:
        nonlocal started, aborted
        started = True
        if services.demo_request_started(request_id=request_id):
            yield {"event": "started"}
        else:  # the row ended meanwhile (the web side gave up or cancelled it)
            aborted = True
            stop()

    try:
        position = max(1, request.queue_position)
        yield {"event": "queued", "position": position}
        reported_at = time.monotonic()
        while True:
            if not stopping and cancel_requested():
                stop()
            try:
                kind, value = pump.items.get(timeout=POLL_S)
            except queue.Empty:
                if started or stopping:
                    continue
                now_position = request.queue_position
                if now_position == 0:
                    yield from start()
                elif now_position != position and time.monotonic() - reported_at >= QUEUED_EVERY_S:
                    position, reported_at = now_position, time.monotonic()
                    yield {"event": "queued", "position": position}
                continue
            if kind == "delta":
                text = value
                while True:  # a slow reader gets what piled up as one delta
                    try:
                        kind, value = pump.items.get_nowait()
                    except queue.Empty:
                        kind = ""
                        break
                    if kind != "delta":
                        break
                    text += value
                if not started and not stopping:
                    yield from start()
                if not stopping and text:
                    yield {"event": "delta", "text": text}
            if kind == "end":
                if not started and not stopping:  # ended at its first token
                    yield from start()
                completion = value
                break
            if kind == "error":
                failure = value
                break
        finished = True
    finally:
        if not finished:  # closed early (client gone) or failed here: free the slot
            request.cancel()
            completion = pump.wait_end(DRAIN_S)
            services.demo_request_finished(
                request_id=request_id,
                status=Status.CANCELLED,
                finish_reason="cancelled",
                **_counts(completion),
            )
            log.info("demo request %s closed early and was cancelled", request_id)

    if failure is not None:
        code, message = classify(failure)
        log.error(
            "demo request %s failed in the %s engine: %r",
            request_id,
            slug,
            failure,
            exc_info=failure,
        )
        if not runtime.engine_is_healthy(engine):
            runtime.discard_engine(slug, engine)
        elif runtime.is_out_of_memory(failure):
            runtime.release_memory()
        yield record_failure(
            request_id, code, message, detail=f"{type(failure).__name__}: {failure}"
        )
        return
    if aborted:
        yield error_event("cancelled", MSG_ENDED)
        return
    if completion.finish_reason == "cancelled":
        services.demo_request_finished(
            request_id=request_id,
            status=Status.CANCELLED,
            finish_reason="cancelled",
            **_counts(completion),
        )
        yield error_event("cancelled", MSG_CANCELLED)
        return
    counts = _counts(completion)
    services.demo_request_finished(
        request_id=request_id,
        status=Status.DONE,
        finish_reason=completion.finish_reason,
        **counts,
    )
    yield {
        "event": "done",
        "finish_reason": completion.finish_reason,
        "tokens_in": counts["tokens_in"],
        "tokens_out": counts["tokens_out"],
        "ttft_ms": counts["ttft_ms"] or 0,
        "tokens_per_s": round(completion.timings.tokens_per_s, 2),
        "duration_ms": counts["duration_ms"],
    }
