"""Catalogue and My downloads. Serving of link URLs lives in weights.serving."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from access.errors import ServiceError
from access.models import Grant
from weights import selectors
from weights.services.fresh_links import FRESH_LINK_LIMITED as FRESH_LINK_LIMITED
from weights.services.fresh_links import fresh_link_issue


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
    try:
        issued = fresh_link_issue(request=request, grant=grant)
    except ServiceError as exc:  # over the allowance, or the grant was revoked
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
