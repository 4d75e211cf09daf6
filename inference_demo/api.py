"""Demo API: POST a prompt, read the generated text back as Server-Sent Events.

Same path as the page (inference_demo.views.generate_response), authenticated by API
token or session. Errors raised by DRF itself (authentication, malformed JSON, body too
large) keep the portal's {"detail": ...} shape; demo refusals use
{"error", "detail", "action_url"}.
"""

from __future__ import annotations

from django.http import HttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.views import APIView

from access.serializers import ErrorSerializer
from inference_demo import serializers as s
from inference_demo import sse
from inference_demo.views import cancel_response, demo_release, generate_response
from portal.api_parsers import JSONParser

_refusal = OpenApiResponse(s.DemoRefusalSerializer)
_error = OpenApiResponse(ErrorSerializer)  # raised by DRF itself: {"detail": ...}

STREAM_EXAMPLE = (
    'event: request\ndata: {"id":7,"cancel_url":"/api/demo/requests/7/cancel"}\n\n'
    'event: queued\ndata: {"position":0}\n\n'
    "event: started\ndata: {}\n\n"
    'event: delta\ndata: {"text":"Once upon"}\n\n'
    'event: delta\ndata: {"text":" a time"}\n\n'
    'event: done\ndata: {"finish_reason":"length","tokens_in":5,"tokens_out":2,'
    '"ttft_ms":41,"tokens_per_s":180.5,"duration_ms":52}\n\n'
)


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
        summary="Generate text with a release's hosted demo, streamed as Server-Sent Events",
        description=sse.EVENTS_DESCRIPTION,
        request=s.DemoGenerateSerializer,
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR,
                description="The event stream described above.",
                examples=[OpenApiExample("A short generation", value=STREAM_EXAMPLE)],
            ),
            400: _refusal,
            401: _error,
            403: _refusal,
            404: _refusal,
            413: _error,
            429: _refusal,
        },
    )
    def post(self, request: Request, slug: str) -> HttpResponse:
        return generate_response(
            user=request.user,
            release=demo_release(slug),
            data=request.data,
            client="api",
            cancel_url=lambda pk: reverse("inference_demo:api_cancel", args=[pk]),
        )


class DemoCancel(DemoAPIView):
    @extend_schema(
        operation_id="demo_cancel",
        summary="Stop a demo request of yours; its stream then ends with the `cancelled` error",
        request=None,
        responses={200: s.DemoCancelSerializer, 404: _refusal},
    )
    def post(self, request: Request, pk: int) -> HttpResponse:
        return cancel_response(user=request.user, pk=pk)
