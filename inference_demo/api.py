"""Demo API: POST a prompt, read the generated text back as Server-Sent Events.

The same rules as the page (inference_demo.views), authenticated by API token or session;
every refusal before the stream starts is the API's error envelope (portal.api_errors),
where the page keeps its own JSON for its script.
"""

from __future__ import annotations

from django.http import HttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework.exceptions import APIException, ErrorDetail
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from inference_demo import serializers as s
from inference_demo import sse, transport
from inference_demo.services import DemoRefused, demo_access, demo_request_create, demo_request_for
from inference_demo.views import demo_release
from portal.api_errors import RETRY_AFTER, error_responses
from portal.api_parsers import JSONParser

DEMO = ["demo"]
# Refusals that say which input field is wrong.
FIELD_OF = {"prompt_empty": "prompt", "prompt_too_long": "prompt"}
# A 429 frees up when a running request ends (seconds) or when the oldest generation of
# the last 24 hours leaves the window; the service does not say when, so these are hints.

STREAM_EXAMPLE = (
    'event: request\ndata: {"id":7,"cancel_url":"/api/demo/requests/7/cancel/"}\n\n'
    'event: queued\ndata: {"position":0}\n\n'
    "event: started\ndata: {}\n\n"
    'event: delta\ndata: {"text":"Once upon"}\n\n'
    'event: delta\ndata: {"text":" a time"}\n\n'
    'event: done\ndata: {"finish_reason":"length","tokens_in":5,"tokens_out":2,'
    '"ttft_ms":41,"tokens_per_s":180.5,"duration_ms":52}\n\n'
)
REFUSALS = (
    "Refusals before the stream starts are the API's error envelope "
    '`{"detail", "code", "errors"}`: 400 invalid input (`errors` per field), 403 no access '
    "(`code` says why: no_grant, pending, revoked, license_not_accepted, ...; `detail` "
    "says where to fix it), 404 no such demo, 429 concurrency limit (`too_many`) or daily "
    "token quota (`quota`), with Retry-After."
)


class DemoRefusal(APIException):
    """A DemoRefused, as the API's error: its status, code and message."""

    def __init__(self, refused: DemoRefused, request: Request) -> None:
        message = str(refused)
        if refused.action_url:
            message = f"{message} See {request.build_absolute_uri(refused.action_url)}"
        super().__init__(ErrorDetail(message, code=refused.code))
        self.status_code = refused.status
        self.field = FIELD_OF.get(refused.code)
        if refused.status == 429:  # DRF's handler writes `wait` as Retry-After
            self.wait = refused.retry_after or 60


class JSONErrorsNegotiation(BaseContentNegotiation):
    """Errors are always JSON, even for a client that asks for text/event-stream only."""

    def select_parser(self, request, parsers):
        return parsers[0]

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class DemoAPIView(APIView):
    parser_classes = [JSONParser]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = JSONErrorsNegotiation


class DemoGenerate(DemoAPIView):
    @extend_schema(
        operation_id="demo_generate",
        tags=DEMO,
        summary="Generate text with a release's hosted demo, streamed as Server-Sent Events",
        description=f"{sse.EVENTS_DESCRIPTION}\n\n{REFUSALS}",
        request=s.DemoGenerateSerializer,
        parameters=[RETRY_AFTER],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR,
                description="The event stream described above.",
                examples=[OpenApiExample("A short generation", value=STREAM_EXAMPLE)],
            ),
            **error_responses(
                400,
                401,
                403,
                404,
                413,
                415,
                429,
                notes={
                    403: "No access to this release's demo; `code` says why.",
                    404: "This release has no demo.",
                    429: "Too many running requests, or the daily token quota is used.",
                },
            ),
        },
    )
    def post(self, request: Request, slug: str) -> HttpResponse:
        data = request.data  # a body that does not parse is a 400, whoever sends it
        release = demo_release(slug)
        try:
            decision = demo_access(request.user, release)
            if not decision.allowed:
                raise DemoRefused(
                    decision.message,
                    code=decision.reason,
                    status=403,
                    action_url=decision.action_url,
                )
            body = s.DemoGenerateSerializer(data=data)
            body.is_valid(raise_exception=True)
            demo_request = demo_request_create(
                user=request.user,
                release=release,
                prompt=body.validated_data["prompt"],
                params=body.params(),
                client="api",
            )
        except DemoRefused as refused:
            raise DemoRefusal(refused, request) from None
        events = transport.stream_request(demo_request)
        cancel_url = reverse("inference_demo:api_cancel", args=[demo_request.pk])
        return sse.stream_response(demo_request, events, cancel_url)


class DemoCancel(DemoAPIView):
    @extend_schema(
        operation_id="demo_cancel",
        tags=DEMO,
        summary="Stop a demo request of yours",
        description="Its stream then ends with the `cancelled` error event. Cancelling a "
        "request that already finished changes nothing.",
        request=None,
        responses={
            200: s.DemoCancelSerializer,
            **error_responses(401, 404, notes={404: "No demo request of yours has this id."}),
        },
    )
    def post(self, request: Request, pk: int) -> Response:
        try:
            demo_request = demo_request_for(user=request.user, request_id=pk)
        except DemoRefused as refused:
            raise DemoRefusal(refused, request) from None
        transport.cancel_request(demo_request.pk)
        return Response(s.DemoCancelSerializer({"id": demo_request.pk, "cancelled": True}).data)
