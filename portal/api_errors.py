"""The API's one error shape, for every status and every view under /api/:

    {"detail": "What went wrong, in a sentence.", "code": "machine_readable", "errors": {}}

`errors` maps each field of a 400 validation error to its messages (nested fields as
`releases.0`); it is `{}` for every other error. DRF views get the envelope from
`exception_handler` (REST_FRAMEWORK's EXCEPTION_HANDLER), whatever raised: a serializer,
a permission, a throttle, a parser, a service (access.errors.ServiceError, with its own
status, code and Retry-After) or Django (Http404, PermissionDenied, a body over
DATA_UPLOAD_MAX_MEMORY_SIZE). The rest of /api/ answers through `endpoint_not_found`
(unknown paths: the URL conf's last pattern) and `JSONErrorsMixin` (views whose success is
HTML or YAML). Plain Django views that answer their own JSON (the Hugging Face Hub
protocol under /api/models/, /api/whoami-v2, /api/resolve-cache/) are left alone: there
is no middleware rewriting responses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import Http404, HttpRequest, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import exceptions, serializers, status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from access.errors import ServiceError

NOT_FOUND_URL_NAME = "api-not-found"
NO_ENDPOINT = "There is no API endpoint at {path}. The endpoints are listed at /api/docs/."
DID_YOU_MEAN = (
    "There is no API endpoint at {path}; did you mean {url}? "
    "API URLs are not redirected, so that no request body is lost."
)
INVALID_INPUT = "Invalid input. {problems}"
BODY_TOO_LARGE = "Request body too large: the API accepts at most {limit} bytes."
TOO_MANY_FIELDS = "Too many fields in the request body."

Errors = dict[str, list[str]]


def envelope(detail: str, code: str, errors: Mapping[str, list[str]] | None = None) -> dict:
    return {"detail": detail, "code": code, "errors": dict(errors or {})}


def error_response(
    detail: str, code: str, http_status: int, errors: Mapping[str, list[str]] | None = None
) -> JsonResponse:
    """The envelope from a plain Django view (no DRF request to hand)."""
    return JsonResponse(envelope(detail, code, errors), status=http_status)


# --- DRF views ---------------------------------------------------------------------------


class BodyTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "body_too_large"

    def __init__(self) -> None:
        super().__init__(BODY_TOO_LARGE.format(limit=settings.DATA_UPLOAD_MAX_MEMORY_SIZE))


def _flatten(detail: Any, name: str = "") -> Errors:
    """DRF's nested error detail as {"field": [...], "releases.0": [...]}."""
    if isinstance(detail, Mapping):
        flat: Errors = {}
        for key, value in detail.items():
            flat.update(_flatten(value, f"{name}.{key}" if name else str(key)))
        return flat
    if isinstance(detail, list):
        if not any(isinstance(item, Mapping | list) for item in detail):
            return {name: [str(item) for item in detail]} if detail else {}
        flat = {}
        for index, item in enumerate(detail):
            flat.update(_flatten(item, f"{name}.{index}" if name else str(index)))
        return flat
    return {name: [str(detail)]}


def _validation_envelope(exc: exceptions.ValidationError) -> dict:
    errors = _flatten(exc.detail)
    general = errors.pop("", []) + errors.pop(api_settings.NON_FIELD_ERRORS_KEY, [])
    problems = " ".join(
        general + [f"{field}: {' '.join(messages)}" for field, messages in errors.items()]
    )
    if errors:
        return envelope(INVALID_INPUT.format(problems=problems), "invalid", errors)
    codes = exc.get_codes()
    code = codes[0] if isinstance(codes, list) and codes and isinstance(codes[0], str) else None
    return envelope(problems or "Invalid input.", code or "invalid")


def _api_exception_envelope(exc: exceptions.APIException) -> dict:
    if isinstance(exc, exceptions.ValidationError):
        return _validation_envelope(exc)
    detail = exc.detail
    if isinstance(detail, Mapping | list):  # an APIException raised with a structure
        flat = _flatten(detail)
        text = " ".join(" ".join(messages) for messages in flat.values())
        return envelope(text or str(exc.default_detail), exc.default_code)
    return envelope(str(detail), getattr(detail, "code", None) or exc.default_code)


def _as_api_exception(exc: Exception) -> Exception:
    """Django's exceptions as DRF's, so that every one gets a status and a code."""
    if isinstance(exc, RequestDataTooBig):
        return BodyTooLarge()
    if isinstance(exc, TooManyFieldsSent | TooManyFilesSent):
        return exceptions.ValidationError(TOO_MANY_FIELDS, code="too_many_fields")
    if isinstance(exc, Http404):
        return exceptions.NotFound(*exc.args)
    if isinstance(exc, DjangoPermissionDenied):
        return exceptions.PermissionDenied(*exc.args)
    return exc


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    # A refusal about one input field says which (`field`), so `errors` can name it.
    field = getattr(exc, "field", None)
    if isinstance(exc, ServiceError):
        errors = {field: [str(exc)]} if field else None
        set_rollback()
        response = Response(envelope(str(exc), exc.code, errors), status=exc.http_status)
        retry_after = getattr(exc, "retry_after", None)  # a refusal that passes with time
        if retry_after is not None:
            response["Retry-After"] = str(retry_after)
        return response
    exc = _as_api_exception(exc)
    response = drf_exception_handler(exc, context)  # status, WWW-Authenticate, Retry-After
    if response is None:
        return None  # not a client error: Django's 500
    response.data = _api_exception_envelope(exc)
    if field and not response.data["errors"]:
        response.data["errors"] = {field: [response.data["detail"]]}
    return response


# --- the rest of /api/ -----------------------------------------------------------------


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
    return error_response(detail, "not_found", status.HTTP_404_NOT_FOUND)


class JSONErrorsMixin:
    """For an APIView that renders HTML or YAML on success: its errors are still JSON."""

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)  # type: ignore[misc]
        self.request.accepted_renderer = JSONRenderer()  # type: ignore[attr-defined]
        self.request.accepted_media_type = JSONRenderer.media_type  # type: ignore[attr-defined]
        return response


# --- the envelope in the OpenAPI schema ------------------------------------------------


class ErrorEnvelopeSerializer(serializers.Serializer):
    """Every error of this API, whatever its status."""

    detail = serializers.CharField(help_text="What went wrong and what to do, in a sentence.")
    code = serializers.CharField(
        help_text="Machine-readable reason, e.g. invalid, not_authenticated, not_found, "
        "illegal_transition, throttled."
    )
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        help_text="For a 400 on input fields: each field's messages (nested fields as "
        "`releases.0`). `{}` for every other error.",
    )


ERROR_DESCRIPTIONS = {
    400: "Invalid input: `errors` has each field's messages; `{}` when the body itself is "
    "unusable (not JSON, not an object, nested too deeply).",
    401: "No credentials, or a token that is invalid, expired, revoked or ended by a "
    "password change (`WWW-Authenticate: Bearer` says how to authenticate).",
    403: "Authenticated but not allowed: `detail` says why, `code` which rule refused.",
    404: "No such object among those you may see.",
    409: "The object's current state does not allow this (`code`: illegal_transition, or "
    "the more precise rule).",
    413: "The body is larger than the API accepts.",
    415: "The body is not JSON: send `Content-Type: application/json`.",
    429: "Too many requests: `Retry-After` gives the seconds to wait.",
}

RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    OpenApiTypes.INT,
    OpenApiParameter.HEADER,
    response=[429],
    description="Seconds until the request may succeed.",
)


def error_responses(
    *statuses: int, notes: Mapping[int, str] | None = None
) -> dict[int, OpenApiResponse]:
    """The documented error responses of an operation, each the ErrorEnvelope."""
    notes = notes or {}
    return {
        code: OpenApiResponse(
            ErrorEnvelopeSerializer,
            description=" ".join(filter(None, [ERROR_DESCRIPTIONS[code], notes.get(code)])),
        )
        for code in statuses
    }
