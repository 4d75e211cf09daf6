"""With Redis down, rate limits fail open and a submission still goes through."""

from __future__ import annotations

import pytest
from django.core.cache import caches
from django.test import override_settings

from access.models import Application
from tests.conftest import FIELDS

DEAD_REDIS = {
    "default": {
        "BACKEND": "portal.cache.FailOpenRedisCache",
        "LOCATION": "redis://127.0.0.1:9/0",
        "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
    }
}


@override_settings(CACHES=DEAD_REDIS)
def test_cache_operations_degrade_to_misses():
    cache = caches["default"]
    assert cache.get("k", "fallback") == "fallback"
    assert cache.add("k", 1) is True
    assert cache.incr("k") == 1
    assert cache.get_many(["a", "b"]) == {}


@pytest.mark.django_db
@override_settings(CACHES=DEAD_REDIS)
def test_submission_succeeds_while_the_cache_is_down(client, alice, releases, license_v1):
    client.force_login(alice)
    response = client.post(
        "/apply/",
        {
            **FIELDS,
            "requested_releases": [releases["llama-7b"].pk],
            "accept_license": "on",
            "action": "submit",
        },
    )
    assert response.status_code == 302, response.content[:300]
    assert Application.objects.get(applicant=alice).status == Application.Status.SUBMITTED
