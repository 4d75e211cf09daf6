"""API errors as one JSON shape: {"detail": ..., "errors": {field: [messages]}}."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import RequestDataTooBig
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from access.errors import ServiceError


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ServiceError):
        return Response({"detail": str(exc), "code": exc.code}, status=exc.http_status)
    if isinstance(exc, RequestDataTooBig):
        return Response(
            {"detail": "Request body too large."}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
        )
    return drf_exception_handler(exc, context)
