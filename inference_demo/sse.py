"""Server-Sent Events for the demo: one stream format for the page and the API.

A stream is a few `event: <name>\\ndata: <json>\\n\\n` frames:

    request  {"id", "cancel_url"}                 first, always
    queued   {"position"}                          while waiting for a slot (0 = next)
    started  {}
    delta    {"text"}                              a piece of generated text
    done     {"finish_reason", "tokens_in", "tokens_out", "ttft_ms", "tokens_per_s",
              "duration_ms"}                       last, on success ("stop" or "length")
    error    {"code", "message"}                   last otherwise: "cancelled" (Stop),
                                                   "unavailable" (no worker), "busy",
                                                   "prompt_too_long", "model_error", "broken"

Refusals before streaming (gating, limits, bad input) are plain JSON, see `refusal`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from django.http import JsonResponse, StreamingHttpResponse

from inference_demo.models import DemoRequest
from inference_demo.services import DemoRefused, demo_request_finished

logger = logging.getLogger("inference_demo.sse")

TERMINAL = ("done", "error")
BROKEN = "The demo failed while generating; try again."

EVENTS_DESCRIPTION = """\
The response is `text/event-stream`: frames `event: <name>` + `data: <JSON>` + a blank line.

| event | data | when |
|---|---|---|
| `request` | `{"id": int, "cancel_url": str}` | first; POST to `cancel_url` to stop |
| `queued` | `{"position": int}` | waiting for a free slot (0 = next) |
| `started` | `{}` | generation began |
| `delta` | `{"text": str}` | a piece of generated text, in order |
| `done` | `{"finish_reason": "stop" or "length", "tokens_in": int, "tokens_out": int, \
"ttft_ms": int, "tokens_per_s": float, "duration_ms": int}` | last event on success |
| `error` | `{"code": str, "message": str}` | last event otherwise. Codes: `cancelled` \
(stopped), `unavailable` (no demo worker answered within seconds), `busy` (queue full), \
`prompt_too_long` (for the model's context), `model_error`, `broken` (stream failed) |

Closing the connection cancels the request and frees its slot."""


def frame(event: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


def relay(demo_request: DemoRequest, events: Iterator[dict], cancel_url: str) -> Iterator[bytes]:
    """Frame transport events; closing this generator (client gone) closes, so cancels, them."""
    try:
        yield frame("request", {"id": demo_request.pk, "cancel_url": cancel_url})
        for event in events:
            data = dict(event)
            name = data.pop("event")
            yield frame(name, data)
            if name in TERMINAL:
                return
        problem = "the transport ended without a final event"
    except Exception as exc:
        logger.exception("demo request %s: stream failed", demo_request.pk)
        problem = repr(exc)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    # Only an open row changes: the transport may have recorded the outcome already.
    demo_request_finished(
        request_id=demo_request.pk, status=DemoRequest.Status.FAILED, error=f"broken: {problem}"
    )
    yield frame("error", {"code": "broken", "message": BROKEN})


def stream_response(
    demo_request: DemoRequest, events: Iterator[dict], cancel_url: str
) -> StreamingHttpResponse:
    response = StreamingHttpResponse(
        relay(demo_request, events, cancel_url), content_type="text/event-stream"
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each frame on at once
    return response


def refusal(exc: DemoRefused, errors: dict | None = None) -> JsonResponse:
    body: dict[str, Any] = {"error": exc.code, "detail": str(exc), "action_url": exc.action_url}
    if errors:
        body["errors"] = errors
    return JsonResponse(body, status=exc.status)
