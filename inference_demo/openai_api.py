"""The OpenAI API on the portal: grantees call the hosted demo with their own tools.

    GET  /api/v1/models                 the demo releases the token's owner may use
    GET  /api/v1/models/<id>            one of them (id = the release's slug)
    POST /api/v1/completions            stream true or false
    POST /api/v1/chat/completions       stream true or false

``openai.OpenAI(base_url="<portal>/api/v1", api_key=<portal API token>)`` works
unchanged (docs/openai_api.md). Only the API token authenticates (the openai client's
``Authorization: Bearer``): no session, so no CSRF to ask for. The rules are the demo's,
in one place: ``services.demo_access`` (grant, license, account) and
``services.demo_request_create`` (limits, concurrency, daily tokens, the record, with
``client="openai"``); request parsing and response bodies are ``openai_protocol``'s, shared
with ``inference_demo.serve``; the text comes from ``transport.stream_request``, the events
the demo page streams. Errors are OpenAI's ``{"error": {message, type, param, code}}`` with
the statuses from which the openai client picks its exception class.

Plain Django views, like the Hugging Face Hub door: the answers are OpenAI's, not the
portal API's envelope, so they are not in the portal's OpenAPI schema either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from functools import wraps
from itertools import chain
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions

from access.authentication import ApiTokenAuthentication
from inference_demo import transport
from inference_demo.models import DemoRequest
from inference_demo.openai_protocol import (
    ApiError,
    Job,
    bad_request,
    chunk,
    model_not_found,
    model_object,
    parse_chat,
    parse_completion,
    response_body,
    usage,
    usage_chunk,
)
from inference_demo.services import (
    CONCURRENCY_RETRY_SECONDS,
    MAX_STOP_CHARS,
    DemoParams,
    DemoRefused,
    demo_access,
    demo_releases,
    demo_request_create,
    demo_request_finished,
)
from inference_demo.sse import BROKEN, TERMINAL
from inference_demo.views import demo_release
from portal.api_parsers import MAX_DEPTH, nesting_exceeds
from weights.models import Release

log = logging.getLogger(__name__)

TOKENS_PAGE = "/account/api-tokens/"
NO_KEY = (
    "You didn't provide an API key. Send a portal API token as the API key "
    "(Authorization: Bearer lap_...); create one at {url}"
)
BAD_KEY = "{detail} Create a new portal API token at {url}"
BODY_TOO_LARGE = "The request body is larger than the {limit} bytes this API accepts."
TOO_DEEP = f"The request body is nested too deeply: at most {MAX_DEPTH} levels are accepted."
OVER_CAP = "{name} must be at most {cap} on this portal's demo, got {n}"
NO_TOP_K = "top_k is not supported by the portal's demo; use temperature and top_p"
REQUEST_ID_HEADER = "X-Demo-Request-Id"  # the DemoRequest, for POST /api/demo/requests/<id>/cancel/

# A DemoRefused's status as OpenAI's error type.
REFUSAL_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}
# Refusals about the prompt, which name it (`prompt`, or `messages` for chat).
PROMPT_CODES = frozenset({"prompt_empty", "prompt_too_long"})
# A terminal `error` event (runner.py) as an HTTP status, when no byte was sent yet.
EVENT_STATUS = {
    "prompt_too_long": 400,
    "busy": 429,
    "unavailable": 503,
    "cancelled": 503,
    "model_error": 500,
    "broken": 500,
}
# OpenAI's own code for a prompt over the context, which tools look for.
EVENT_CODES = {"prompt_too_long": "context_length_exceeded"}


class ApiRefusal(ApiError):
    """An ApiError that passes with time: answered with Retry-After."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None, **kw) -> None:
        super().__init__(status, message, **kw)
        self.retry_after = retry_after


def error_response(error: ApiError) -> JsonResponse:
    response = JsonResponse(error.body(), status=error.status)
    if error.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def openai_door(*methods: str) -> Callable:
    """Exempt from CSRF (token only), `methods` only, every refusal in OpenAI's shape."""
    allowed = (*methods, "HEAD") if "GET" in methods else methods

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @csrf_exempt
        @wraps(view)
        def door(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in allowed:
                error = ApiError(
                    405,
                    f"Method {request.method} not allowed on {request.path}; use "
                    f"{', '.join(methods)}",
                    code="method_not_allowed",
                )
                response = error_response(error)
                response["Allow"] = ", ".join(allowed)
                return response
            try:
                return view(request, *args, **kwargs)
            except ApiError as error:
                return error_response(error)

        return door

    return decorate


# --- the caller, the model, the body ---------------------------------------------------


def token_user(request: HttpRequest) -> AbstractBaseUser:
    url = request.build_absolute_uri(TOKENS_PAGE)
    try:
        found = ApiTokenAuthentication().authenticate(request)
    except exceptions.AuthenticationFailed as error:
        message = BAD_KEY.format(detail=error.detail, url=url)
        raise ApiError(401, message, code="invalid_api_key") from None
    if found is None:
        raise ApiError(401, NO_KEY.format(url=url))
    return found[0]


def refusal(refused: DemoRefused, request: HttpRequest, param: str | None = None) -> ApiRefusal:
    """A demo rule's refusal in OpenAI's shape: the same words, and where to fix it."""
    message = str(refused)
    if refused.action_url:
        message = f"{message} See {request.build_absolute_uri(refused.action_url)}"
    retry_after = (refused.retry_after or 60) if refused.status == 429 else None
    return ApiRefusal(
        refused.status,
        message,
        type=REFUSAL_TYPES.get(refused.status, "invalid_request_error"),
        param=param if refused.code in PROMPT_CODES else None,
        code=refused.code,
        retry_after=retry_after,
    )


def usable_release(user: AbstractBaseUser, name: str, request: HttpRequest) -> Release:
    """The demo release `name`, when `user` may use it: else 404 or 403 with the reason."""
    try:
        release = demo_release(name)  # the demo page's and the demo API's rule
    except Http404:
        raise model_not_found(name) from None
    decision = demo_access(user, release)
    if not decision.allowed:
        refused = DemoRefused(
            decision.message, code=decision.reason, status=403, action_url=decision.action_url
        )
        raise refusal(refused, request)
    return release


def release_model(release: Release) -> dict[str, Any]:
    created = release.published_at or release.created_at
    return model_object(release.slug, int(created.timestamp()))


def json_body(request: HttpRequest) -> Any:
    try:
        raw = request.body
    except RequestDataTooBig:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raise ApiError(413, BODY_TOO_LARGE.format(limit=limit), code="request_too_large") from None
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise bad_request(TOO_DEEP) from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    if nesting_exceeds(body, MAX_DEPTH):
        raise bad_request(TOO_DEEP)
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def demo_params(job: Job, body: dict[str, Any]) -> DemoParams:
    """The job as the demo's parameters; what the demo cannot honour is a 400, not ignored."""
    cap = settings.DEMO_LIMITS["max_new_tokens"]
    if job.max_tokens > cap:
        name = "max_tokens"
        if job.kind == "chat" and body.get("max_completion_tokens") is not None:
            name = "max_completion_tokens"
        message = OVER_CAP.format(name=name, cap=cap, n=job.max_tokens)
        raise bad_request(message, param=name, code="integer_above_max_value")
    if job.top_k is not None:
        raise bad_request(NO_TOP_K, param="top_k", code="unsupported_parameter")
    too_long = next((s for s in job.stop if len(s) > MAX_STOP_CHARS), None)
    if too_long is not None:
        message = f"stop sequences are at most {MAX_STOP_CHARS} characters on this portal"
        raise bad_request(message, param="stop", code="string_above_max_length")
    top_p = 1.0 if job.top_p is None else job.top_p
    return DemoParams(
        max_new_tokens=job.max_tokens,
        temperature=job.temperature,
        top_p=top_p,
        seed=job.seed,
        stop=job.stop,
    )


# --- events to OpenAI answers ------------------------------------------------------------


def until_terminal(row: DemoRequest, events: Iterator[dict]) -> Iterator[dict]:
    """The transport's events up to the terminal one. Closing this closes, so cancels, the
    transport; a transport that fails or ends without a terminal event is recorded as
    broken and ends with the `broken` error event, as sse.relay does for the page."""
    try:
        for event in events:
            yield event
            if event.get("event") in TERMINAL:
                return
        problem = "the transport ended without a final event"
    except Exception as exc:
        log.exception("demo request %s: stream failed", row.pk)
        problem = repr(exc)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    demo_request_finished(
        request_id=row.pk, status=DemoRequest.Status.FAILED, error=f"broken: {problem}"
    )
    yield {"event": "error", "code": "broken", "message": BROKEN}


def event_error(event: dict, job: Job) -> ApiError:
    code = event.get("code", "broken")
    status = EVENT_STATUS.get(code, 500)
    return ApiRefusal(
        status,
        event.get("message") or BROKEN,
        type="invalid_request_error" if status == 400 else "server_error",
        param=job.prompt_param if code == "prompt_too_long" else None,
        code=EVENT_CODES.get(code, code),
        retry_after=CONCURRENCY_RETRY_SECONDS if status == 429 else None,  # slots free in seconds
    )


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def sse_chunks(job: Job, first: dict, events: Iterator[dict]) -> Iterator[bytes]:
    """OpenAI's stream: chunks, the usage chunk if asked for, `[DONE]`; a failure is an
    `{"error"}` event and no `[DONE]`. Queue and start events go out as SSE comments,
    which clients skip: every write lets the server notice a client that went away."""
    try:
        if job.kind == "chat":
            yield _data(chunk(job, None))
        for event in chain([first], events):
            name = event["event"]
            if name == "delta":
                yield _data(chunk(job, event["text"]))
            elif name == "done":
                yield _data(
                    chunk(job, "" if job.kind == "completion" else None, event["finish_reason"])
                )
                if job.include_usage:
                    yield _data(usage_chunk(job, usage(event["tokens_in"], event["tokens_out"])))
                yield b"data: [DONE]\n\n"
                return
            elif name == "error":
                yield _data(event_error(event, job).body())
                return
            else:
                yield f": {name}\n\n".encode()
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def complete(job: Job, first: dict, events: Iterator[dict]) -> dict[str, Any]:
    """The non-streaming answer, assembled from the same events."""
    text: list[str] = []
    try:
        for event in chain([first], events):
            if event["event"] == "delta":
                text.append(event["text"])
            elif event["event"] == "done":
                counts = usage(event["tokens_in"], event["tokens_out"])
                return response_body(job, "".join(text), event["finish_reason"], counts)
            elif event["event"] == "error":
                raise event_error(event, job)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    raise event_error({"code": "broken"}, job)  # until_terminal always ends with one


# --- views -------------------------------------------------------------------------------


@openai_door("GET")
def models_list(request: HttpRequest) -> HttpResponse:
    user = token_user(request)
    data = [release_model(r) for r in demo_releases() if demo_access(user, r).allowed]
    return JsonResponse({"object": "list", "data": data})


@openai_door("GET")
def model_retrieve(request: HttpRequest, model: str) -> HttpResponse:
    return JsonResponse(release_model(usable_release(token_user(request), model, request)))


@openai_door("POST")
def completions(request: HttpRequest) -> HttpResponse:
    return generate(request, "completion")


@openai_door("POST")
def chat_completions(request: HttpRequest) -> HttpResponse:
    return generate(request, "chat")


def generate(request: HttpRequest, kind: str) -> HttpResponse:
    user = token_user(request)
    body = json_body(request)
    name = body.get("model") if isinstance(body, dict) else None
    # Which model, and whether this caller may use it, before the rest of the body.
    release = usable_release(user, name, request) if isinstance(name, str) and name else None
    if kind == "completion":
        job = parse_completion(body, name)
    else:
        job = parse_chat(body, name, settings.DEMO_LIMITS["max_new_tokens"])
    assert release is not None  # parsing refused a body without a model
    params = demo_params(job, body)
    try:
        row = demo_request_create(
            user=user, release=release, prompt=job.prompt, params=params, client="openai"
        )
    except DemoRefused as refused:
        raise refusal(refused, request, param=job.prompt_param) from None
    events = until_terminal(row, transport.stream_request(row))
    # The first event says whether generation began; a refusal there (busy, prompt too
    # long for the model, no worker) still gets its own status.
    first = next(events)
    if first["event"] == "error":
        events.close()
        raise event_error(first, job)
    if job.stream:
        response: HttpResponse = StreamingHttpResponse(
            sse_chunks(job, first, events), content_type="text/event-stream; charset=utf-8"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each chunk on at once
    else:
        response = JsonResponse(complete(job, first, events))
    response[REQUEST_ID_HEADER] = str(row.pk)
    return response


@csrf_exempt
def unknown_url(request: HttpRequest, path: str = "") -> HttpResponse:
    message = f"Invalid URL ({request.method} {request.path})"
    return error_response(ApiError(404, message, code="unknown_url"))
