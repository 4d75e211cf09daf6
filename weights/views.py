"""Catalogue and My downloads. Serving of link URLs lives in weights.serving."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from django_ratelimit.core import is_ratelimited

from access.models import Grant
from weights import selectors
from weights.services.links import LinkRefused, link_issue

FRESH_LINK_LIMITED = "You requested several fresh links recently; try again in an hour."


def catalogue(request: HttpRequest) -> HttpResponse:
    return render(request, "weights/catalogue.html", {"releases": selectors.catalogue()})


@login_required
def my_downloads(request: HttpRequest) -> HttpResponse:
    fresh = request.session.pop("weights_fresh_link", None)
    return render(
        request,
        "weights/my_downloads.html",
        {"downloads": selectors.downloads_for(user=request.user), "fresh": fresh},
    )


@login_required
@require_POST
def fresh_link(request: HttpRequest, grant_id: int) -> HttpResponse:
    grant = get_object_or_404(Grant, pk=grant_id, user=request.user)
    if is_ratelimited(
        request,
        group="weights.fresh_link",
        key="user",
        rate=settings.WEIGHTS_FRESH_LINK_RATE,
        increment=True,
    ):
        messages.error(request, FRESH_LINK_LIMITED)
        return redirect("weights:my_downloads")
    try:
        issued = link_issue(grant=grant)
    except LinkRefused as exc:
        messages.error(request, str(exc))
        return redirect("weights:my_downloads")
    # Shown once on the next page; never stored beyond this session round trip.
    request.session["weights_fresh_link"] = {
        "release": grant.release.name,
        "url": request.build_absolute_uri(issued.path),
    }
    messages.success(
        request, f"New link for {grant.release.name}; the previous link no longer works."
    )
    return redirect("weights:my_downloads")
