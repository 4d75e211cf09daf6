from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest


def portal(request: HttpRequest) -> dict[str, object]:
    return {
        "PORTAL_DEV_MODE": settings.DEBUG,
        "PORTAL_ADMIN_REQUIRE_2FA": settings.PORTAL_ADMIN_REQUIRE_2FA,
    }
