"""API errors as one JSON shape: {"detail": ..., "code": ...} (DRF's {"detail": ...} for its own).

Everything under /api/ answers in it: unknown paths (`endpoint_not_found`, the URL
conf's last pattern), wrong methods (DRF's 405 with Allow) and the errors of views
whose success is not JSON (`JSONErrorsMixin`: the schema and the docs page).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework import status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from access.errors import ServiceError

NOT_FOUND_URL_NAME = "api-not-found"
NO_ENDPOINT = "There is no API endpoint at {path}. The endpoints are listed at /api/docs/."
DID_YOU_MEAN = (
    "There is no API endpoint at {path}; did you mean {url}? "
    "API URLs are not redirected, so that no request body is lost."
)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ServiceError):
        response = Response({"detail": str(exc), "code": exc.code}, status=exc.http_status)
        retry_after = getattr(exc, "retry_after", None)  # a refusal that passes with time
        if retry_after is not None:
            response["Retry-After"] = str(retry_after)
        return response
    if isinstance(exc, RequestDataTooBig):
        return Response(
            {"detail": "Request body too large."}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
        )
    return drf_exception_handler(exc, context)


def _endpoint_nearby(path_info: str) -> str | None:
    """The same path with the trailing slash added or removed, when that is an endpoint."""
    other = path_info[:-1] if path_info.endswith("/") else path_info + "/"
    try:
        match = resolve(other)
    except Resolver404:
        return None
    return None if match.url_name == NOT_FOUND_URL_NAME else other


@csrf_exempt  # any method, with or without a session: the answer is the same 404
def endpoint_not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    nearby = _endpoint_nearby(request.path_info)
    if nearby is None:
        detail = NO_ENDPOINT.format(path=request.path)
    else:
        prefix = request.path[: len(request.path) - len(request.path_info)]
        detail = DID_YOU_MEAN.format(path=request.path, url=prefix + nearby)
    return JsonResponse({"detail": detail, "code": "not_found"}, status=status.HTTP_404_NOT_FOUND)


class JSONErrorsMixin:
    """For an APIView that renders HTML or YAML on success: its errors are still JSON."""

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)  # type: ignore[misc]
        self.request.accepted_renderer = JSONRenderer()  # type: ignore[attr-defined]
        self.request.accepted_media_type = JSONRenderer.media_type  # type: ignore[attr-defined]
        return response
