from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from access.selectors import application_open_for, grants_for
from access.services.licenses import license_current
from weights.models import Release


def home(request: HttpRequest) -> HttpResponse:
    context = {"releases": Release.objects.all(), "license": license_current()}
    if request.user.is_authenticated:
        context["open_application"] = application_open_for(user=request.user)
        context["grants"] = grants_for(user=request.user).filter(revoked_at__isnull=True)
    return render(request, "portal/home.html", context)
