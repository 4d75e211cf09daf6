"""The portal's URLs plus the trivial baseline view (see prove.settings)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path

from portal.urls import handler500  # noqa: F401  (the same 503-on-database-down handler)
from portal.urls import urlpatterns as portal_urlpatterns


def trivial(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"ok\n", content_type="text/plain")


urlpatterns = [path("_prove/trivial/", trivial), *portal_urlpatterns]
