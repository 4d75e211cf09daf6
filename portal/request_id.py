"""Request ids: one per request, echoed on the response and carried by every log line.

A proxy in front (nginx's ``$request_id``) may send ``X-Request-ID``; a sane value is
kept so that proxy and portal lines share an id, anything else is replaced by a fresh
one. The id lives in a context variable that `RequestIdFilter` copies onto each log
record. It is cleared when the response is closed, after Django has logged the
request's 4xx/5xx line. Celery tasks outside a request log under their task id.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from collections.abc import Callable

from celery.signals import task_postrun, task_prerun
from django.core.signals import request_finished
from django.http import HttpRequest, HttpResponse

HEADER = "X-Request-ID"
NO_REQUEST = "-"
# Ids as proxies make them (hex, UUIDs, dotted or colon-separated): nothing that could
# forge a log line, hide a path or grow without bound.
_SANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default=NO_REQUEST)


def get_request_id() -> str:
    return _current.get()


def request_id_from(value: str | None) -> str:
    """The caller's id when it is sane, else a new random one."""
    if value and _SANE.fullmatch(value):
        return value
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        request_finished.connect(_clear, dispatch_uid="portal.request_id.clear")

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = request_id_from(request.headers.get(HEADER))
        request.request_id = request_id
        _current.set(request_id)
        response = self.get_response(request)
        response[HEADER] = request_id
        return response


def _clear(**kwargs: object) -> None:
    _current.set(NO_REQUEST)


class RequestIdFilter(logging.Filter):
    """Put the current request id on the record (``%(request_id)s`` in formats)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = _current.get()
        return True


@task_prerun.connect(dispatch_uid="portal.request_id.task_started")
def _task_started(task_id: str | None = None, **kwargs: object) -> None:
    # An eager task inside a request keeps the request's id; a worker's task gets its own.
    if task_id and _current.get() == NO_REQUEST:
        _current.set(f"task-{task_id}")


@task_postrun.connect(dispatch_uid="portal.request_id.task_finished")
def _task_finished(task_id: str | None = None, **kwargs: object) -> None:
    if task_id and _current.get() == f"task-{task_id}":
        _current.set(NO_REQUEST)
