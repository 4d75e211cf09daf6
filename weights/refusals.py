"""Refusal responses of the download endpoints, and the headers every download response carries.

A refusal says what happened and what to do, as a short HTML page or as JSON
(`{"error", "detail", "action_url"}`) when the client asks for JSON. It never
echoes the request URL: the URL holds the bearer token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps

from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

from weights.models import DownloadEvent
from weights.services.links import (
    BudgetSpent,
    LicenseRequired,
    LinkExpired,
    LinkInvalid,
    LinkRefused,
    LinkRevoked,
)

logger = logging.getLogger("weights.serving")

Outcome = DownloadEvent.Outcome

NOT_FOUND = "There is no such file in this release. Compare the path with the release's manifest."
BAD_RANGE = "The requested byte range starts past the end of the file ({size} bytes)."
UNAVAILABLE = "This file is temporarily unavailable. Try again in a few minutes."

TITLES = {
    "invalid": "This link is not valid",
    "expired": "This link has expired",
    "revoked": "Access revoked",
    "license": "The license has changed",
    "budget": "Download budget spent",
    "not_found": "No such file",
    "bad_range": "Range not satisfiable",
    "unavailable": "Temporarily unavailable",
}

_OUTCOMES = {
    LinkInvalid: Outcome.INVALID,
    LinkExpired: Outcome.EXPIRED,
    LinkRevoked: Outcome.REVOKED,
    LicenseRequired: Outcome.LICENSE,
    BudgetSpent: Outcome.BUDGET,
}


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    outcome: str
    action_url: str = ""
    link_id: int | None = None  # for our own log line: never the token, nor part of it

    @classmethod
    def from_error(cls, error: LinkRefused) -> Refusal:
        return cls(
            status=error.status,
            code=error.code,
            message=str(error),
            outcome=_OUTCOMES.get(type(error), Outcome.REVOKED),
            action_url=error.action_url,
            link_id=error.link.pk if error.link else None,
        )


def not_found() -> Refusal:
    return Refusal(404, "not_found", NOT_FOUND, Outcome.NOT_FOUND)


def unavailable() -> Refusal:
    return Refusal(503, "unavailable", UNAVAILABLE, Outcome.UNAVAILABLE)


def preparing(message: str) -> Refusal:
    """A fingerprinted release's file before the grantee's checksums exist (a 503: retry)."""
    return Refusal(503, "preparing", message, Outcome.UNAVAILABLE)


def bad_range(size: int) -> Refusal:
    return Refusal(416, "bad_range", BAD_RANGE.format(size=size), Outcome.BAD_RANGE)


def protect(response: HttpResponse, *, cache: str = "private, no-store") -> HttpResponse:
    """Headers for anything under /d/<token>/: no Referer carrying the token, no caches, no index."""
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = cache
    response["X-Robots-Tag"] = "noindex, nofollow"
    return response


def quiet(response: HttpResponse) -> HttpResponse:
    """Stop django.request from logging this 4xx with the request path, which holds the token."""
    response._has_been_logged = True  # the flag Django's log_response checks
    return response


def safe_methods(view: Callable) -> Callable:
    """Like require_safe, without django.request logging the path (it holds the token).

    Exempt from CSRF: these views change nothing, so a POST is told 405 (not 403, which
    reads as "forbidden for you" and sends people looking for a cookie).
    """

    @csrf_exempt
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return quiet(protect(HttpResponseNotAllowed(["GET", "HEAD"])))
        return view(request, *args, **kwargs)

    return wrapper


def wants_json(request: HttpRequest) -> bool:
    accept = request.headers.get("Accept", "")
    return any(
        part.split(";")[0].strip().lower() == "application/json" for part in accept.split(",")
    )


def refusal_response(
    request: HttpRequest, refusal: Refusal, *, as_json: bool | None = None
) -> HttpResponse:
    """Render `refusal` for a person (HTML) or a program (JSON)."""
    action_url = request.build_absolute_uri(refusal.action_url) if refusal.action_url else ""
    if as_json if as_json is not None else wants_json(request):
        response = JsonResponse(
            {"error": refusal.code, "detail": refusal.message, "action_url": action_url or None},
            status=refusal.status,
        )
    else:
        context = {
            "code": refusal.code,
            "title": TITLES.get(refusal.code, "Download refused"),
            "message": refusal.message,
            "action_url": action_url,
            "downloads_url": reverse("weights:my_downloads"),
        }
        body = render_to_string("weights/refused.html", context, request=request)
        response = HttpResponse(body, status=refusal.status)
    logger.info("download refused: %s (link id %s)", refusal.code, refusal.link_id or "-")
    return quiet(protect(response))
