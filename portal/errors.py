"""Server-error views. A database that is down is a 503 the client can retry, not a 500."""

from __future__ import annotations

import sys

from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.views.defaults import server_error as django_server_error

from portal.api_errors import error_response

UNAVAILABLE = "The portal is briefly unavailable (database unreachable). Try again in a minute."
SERVER_ERROR = "Something went wrong on our side; it has been logged. Try again later."
RETRY_AFTER_SECONDS = 30


def _database_down(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, OperationalError | InterfaceError):
            return True
        if isinstance(exc, DatabaseError) and "connection" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def server_error(request: HttpRequest) -> HttpResponse:
    # Django calls handler500 inside its except block, so the exception is still at hand.
    if _database_down(sys.exc_info()[1]):
        wants_json = "application/json" in request.headers.get(
            "Accept", ""
        ) or request.path.startswith("/api/")
        if wants_json:
            response: HttpResponse = error_response(UNAVAILABLE, "unavailable", 503)
        else:
            response = HttpResponse(
                UNAVAILABLE, status=503, content_type="text/plain; charset=utf-8"
            )
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        response["Cache-Control"] = "no-store"
        return response
    if request.path.startswith("/api/"):
        return error_response(SERVER_ERROR, "server_error", 500)
    return django_server_error(request)
