"""The rules every API door obeys, run through the doors added for the whole journey:
tokens, grants and fresh links, claims, direct grants. Anonymous → 401; a researcher's
token on a reviewer door → 403; one review rate limit for old and new doors; malformed
bodies → the envelope's 400 with nothing written; a researcher sees only their own grants."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient
from rest_framework.throttling import ScopedRateThrottle

from access.models import Application, Grant
from access.services.reviews import application_approve
from tests.tokens import api_token

pytestmark = pytest.mark.django_db
ENVELOPE = {"detail", "code", "errors"}


def bearer(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token(user)}")
    return client


def reviewer_doors(application: Application) -> list[tuple[str, str, dict | None]]:
    base = f"/api/review/applications/{application.pk}/"
    return [
        ("post", base + "claim/", {}),
        ("post", base + "release-claim/", None),
        ("get", "/api/review/grants/", None),
        ("post", "/api/review/grants/", {"user": "x@y.org", "release": "llama-7b", "reason": "r"}),
        ("post", "/api/review/grants/1/revoke/", {"reason": "No."}),
    ]


def researcher_doors(grant_id: int) -> list[tuple[str, str, dict | None]]:
    return [
        ("get", "/api/tokens/", None),
        ("get", "/api/grants/", None),
        ("get", f"/api/grants/{grant_id}/", None),
        ("post", f"/api/grants/{grant_id}/links/", None),
    ]


@pytest.fixture
def application(alice, make_submitted):
    return make_submitted(alice, slugs=("llama-7b",))


def test_anonymous_requests_get_401_in_the_envelope_on_every_new_door(application):
    anonymous = APIClient()
    for method, url, body in [*reviewer_doors(application), *researcher_doors(1)]:
        response = getattr(anonymous, method)(url, body, format="json")
        assert response.status_code == 401, url
        assert set(response.json()) == ENVELOPE, url
    assert not Grant.objects.exists()


def test_a_researchers_token_opens_no_reviewer_door(alice, application):
    api = bearer(alice)
    for method, url, body in reviewer_doors(application):
        response = getattr(api, method)(url, body, format="json")
        assert response.status_code == 403, url
        assert set(response.json()) == ENVELOPE
    assert Application.objects.get(pk=application.pk).claimed_by_id is None
    assert not Grant.objects.exists()


def test_the_review_rate_limit_covers_the_new_reviewer_doors(
    reviewer_client, application, monkeypatch
):
    monkeypatch.setitem(ScopedRateThrottle.THROTTLE_RATES, "review", "2/hour")
    assert reviewer_client.get("/api/review/applications/").status_code == 200
    assert reviewer_client.get("/api/review/grants/").status_code == 200
    for method, url, body in reviewer_doors(application):
        response = getattr(reviewer_client, method)(url, body, content_type="application/json")
        assert response.status_code == 429, url
        assert response.json()["code"] == "throttled" and "Retry-After" in response
    assert Application.objects.get(pk=application.pk).claimed_by_id is None


@pytest.mark.parametrize("body", [b"{", b"[1, 2]", "\ufeff{}".encode(), b"\xff\xfe"])
def test_malformed_bodies_on_the_new_posts_are_400s_that_write_nothing(
    reviewer_client, application, body
):
    for url in (
        f"/api/review/applications/{application.pk}/claim/",
        "/api/review/grants/",
        "/api/review/grants/1/revoke/",
    ):
        response = reviewer_client.post(url, body, content_type="application/json")
        assert response.status_code in (400, 404), (url, response.status_code)
        assert set(response.json()) == ENVELOPE
    assert Application.objects.get(pk=application.pk).claimed_by_id is None
    assert not Grant.objects.exists()


def test_wrongly_typed_fields_of_a_direct_grant_are_named(reviewer_client):
    response = reviewer_client.post(
        "/api/review/grants/",
        {"user": ["a"], "release": {"slug": 1}, "reason": 7},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert {"user", "release"} <= set(response.json()["errors"])
    assert not Grant.objects.exists()


def test_a_researcher_sees_and_links_only_their_own_grants(
    alice, bob, reviewer, make_submitted, releases
):
    [alices] = application_approve(
        application=make_submitted(alice, slugs=("llama-7b",)),
        reviewer=reviewer,
        releases=[releases["llama-7b"]],
    )
    [bobs] = application_approve(
        application=make_submitted(bob, slugs=("llama-7b",)),
        reviewer=reviewer,
        releases=[releases["llama-7b"]],
    )
    api = bearer(alice)
    assert [g["id"] for g in api.get("/api/grants/").json()] == [alices.pk]
    links_before = bobs.download_links.count()
    for method, url, _ in researcher_doors(bobs.pk)[2:]:
        response = getattr(api, method)(url)
        assert response.status_code == 404, url
        assert set(response.json()) == ENVELOPE
    assert bobs.download_links.count() == links_before
    assert api.delete("/api/tokens/nosuchkey/").status_code == 404
