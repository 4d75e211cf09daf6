"""Probes for load balancers and orchestrators.

``/healthz`` says the process answers (no database, nothing else), so a restart is
only ever triggered by a wedged process. ``/readyz`` says whether this instance can do
its work now: the database answers, Redis answers when one is configured, and weight
storage is usable. A failed dependency gives 503 and the names of the failed checks,
so traffic moves elsewhere until it recovers; no restart is needed. Error details go
to the log, only exception class names to the response.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from weights.storage import LocalStorage, S3Storage, get_storage

logger = logging.getLogger(__name__)

OK = "ok"
SKIPPED = "skipped"
TIMEOUT_S = 2


def check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return OK


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)


def check_redis() -> str:
    if not settings.REDIS_URL:
        return SKIPPED
    client = redis_client(settings.REDIS_URL)
    try:
        client.ping()
    finally:
        client.close()
    return OK


def check_storage() -> str:
    storage = get_storage()
    if isinstance(storage, S3Storage):
        storage.client.head_bucket(Bucket=storage.bucket)
    elif isinstance(storage, LocalStorage):
        # The first publish creates the root; creating it here is no different.
        storage.root.mkdir(parents=True, exist_ok=True)
        if not os.access(storage.root, os.W_OK | os.X_OK):
            raise PermissionError(f"{storage.root} is not writable")
    return OK


CHECKS: dict[str, Callable[[], str]] = {
    "database": check_database,
    "redis": check_redis,
    "storage": check_storage,
}


def run_checks() -> dict[str, str]:
    results = {}
    for name, check in CHECKS.items():
        try:
            results[name] = check()
        except Exception as exc:
            logger.warning("readiness check %s failed: %s: %s", name, type(exc).__name__, exc)
            results[name] = f"error: {type(exc).__name__}"
    return results


@never_cache
@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


@never_cache
@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    checks = run_checks()
    failed = [name for name, result in checks.items() if result not in (OK, SKIPPED)]
    body = {"status": "unavailable" if failed else "ok", "checks": checks}
    if failed:
        body["failed"] = failed
    return JsonResponse(body, status=503 if failed else 200)
