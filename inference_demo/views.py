"""Demo pages: the list, the gated page, and the endpoints its script calls.

The page posts the form with fetch (CSRF header) to `generate`, which answers with
Server-Sent Events (see inference_demo.sse) read from the response body; Stop posts to
`cancel`. Rules (gating, limits) live in inference_demo.services.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from access.policies import SIGN_IN
from inference_demo import runtime, sse, transport
from inference_demo.serializers import DemoGenerateSerializer, default_params
from inference_demo.services import (
    NOT_YOURS,
    DemoRefused,
    demo_access,
    demo_releases,
    demo_request_create,
    demo_request_for,
)
from weights.models import Release

INVALID = "Check the request: {problems}"
REFUSAL_TITLES = {
    "sign_in": "Sign in to try the demo",
    "no_grant": "You have no access to this release yet",
    "pending": "Your application is being reviewed",
    "revoked": "Your access was revoked",
    "license_not_accepted": "Accept the current license first",
}


def demo_release(slug: str) -> Release:
    if slug not in runtime.demo_slugs():
        raise Http404("No demo for this release.")
    return get_object_or_404(Release, slug=slug)


def demo_list(request: HttpRequest) -> HttpResponse:
    rows = [(release, demo_access(request.user, release)) for release in demo_releases()]
    return render(request, "inference_demo/demo_list.html", {"rows": rows})


def demo_page(request: HttpRequest, slug: str) -> HttpResponse:
    release = demo_release(slug)
    decision = demo_access(request.user, release)
    if decision.reason == SIGN_IN:
        return redirect_to_login(request.get_full_path())
    if not decision.allowed:
        context = {
            "release": release,
            "decision": decision,
            "title": REFUSAL_TITLES.get(decision.reason, "The demo is not available to you"),
        }
        return render(request, "inference_demo/refused.html", context, status=403)
    context = {
        "release": release,
        "limits": settings.DEMO_LIMITS,
        "defaults": default_params(),
        "available": transport.demo_available(release.slug),
    }
    return render(request, "inference_demo/demo.html", context)


@require_POST
def generate(request: HttpRequest, slug: str) -> HttpResponse:
    return generate_response(
        user=request.user,
        release=demo_release(slug),
        data=request.POST,
        client="web",
        cancel_url=lambda pk: reverse("inference_demo:cancel", args=[pk]),
    )


@require_POST
def cancel(request: HttpRequest, pk: int) -> HttpResponse:
    return cancel_response(user=request.user, pk=pk)


def generate_response(
    *, user, release: Release, data: Any, client: str, cancel_url: Callable[[int], str]
) -> HttpResponse:
    """Shared by the page and the API: gate, parse, create the record, stream its events."""
    decision = demo_access(user, release)
    if not decision.allowed:
        refused = DemoRefused(
            decision.message, code=decision.reason, status=403, action_url=decision.action_url
        )
        return sse.refusal(refused)
    serializer = DemoGenerateSerializer(data=data)
    if not serializer.is_valid():
        problems = "; ".join(
            f"{field}: {' '.join(str(m) for m in messages)}"
            for field, messages in serializer.errors.items()
        )
        refused = DemoRefused(INVALID.format(problems=problems), code="invalid_params")
        return sse.refusal(refused, errors=serializer.errors)
    try:
        demo_request = demo_request_create(
            user=user,
            release=release,
            prompt=serializer.validated_data["prompt"],
            params=serializer.params(),
            client=client,
        )
    except DemoRefused as exc:
        return sse.refusal(exc)
    events = transport.stream_request(demo_request)
    return sse.stream_response(demo_request, events, cancel_url(demo_request.pk))


def cancel_response(*, user, pk: int) -> HttpResponse:
    try:
        if not user.is_authenticated:
            raise DemoRefused(NOT_YOURS, code="not_found", status=404)
        demo_request = demo_request_for(user=user, request_id=pk)
    except DemoRefused as exc:
        return sse.refusal(exc)
    transport.cancel_request(demo_request.pk)
    return JsonResponse({"id": demo_request.pk, "cancelled": True})
