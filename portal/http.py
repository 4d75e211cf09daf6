"""Facts about the client that several apps record (license acceptance, downloads)."""

from __future__ import annotations

from django.http import HttpRequest


def client_ip(request: HttpRequest) -> str | None:
    # REMOTE_ADDR is the real client: gunicorn's config replaces it with the address
    # nginx saw, and only for requests from a trusted proxy.
    return request.META.get("REMOTE_ADDR") or None


def user_agent(request: HttpRequest) -> str:
    return request.headers.get("User-Agent", "")[:300]
