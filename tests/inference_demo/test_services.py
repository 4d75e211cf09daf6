"""Demo rules: gating by the shared access check, limits, and records."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from access.services import reviews
from access.services.licenses import license_publish
from inference_demo.models import DemoRequest
from inference_demo.services import (
    DemoParams,
    DemoRefused,
    demo_request_create,
    demo_request_finished,
    demo_requests_purge,
)
from tests.factories import ReleaseFactory

pytestmark = pytest.mark.django_db
LIMITS = {
    "max_prompt_chars": 50,
    "max_new_tokens": 64,
    "max_temperature": 2.0,
    "concurrent_per_user": 2,
    "daily_tokens": 100,
    "stale_after_s": 600,
}


@pytest.fixture
def demo(db):
    return ReleaseFactory(slug="llama-demo", name="LLaMA demo")


@pytest.fixture
def grantee(alice, reviewer, make_submitted, demo):
    application = make_submitted(alice, slugs=("llama-7b",))
    application.requested_releases.add(demo)
    reviews.application_approve(application=application, reviewer=reviewer, releases=[demo])
    return alice


def create(user, release, prompt="def main():", **params):
    return demo_request_create(
        user=user, release=release, prompt=prompt, params=DemoParams(**params)
    )


def test_grantee_creates_a_recorded_request(grantee, demo):
    request = create(grantee, demo, max_new_tokens=16, temperature=0.0)
    assert request.status == DemoRequest.Status.QUEUED and request.params["max_new_tokens"] == 16


@pytest.mark.parametrize("who", ["charlie", "superseded", "revoked"])
def test_refused_without_an_active_grant_and_current_license(who, grantee, charlie, reviewer, demo):
    user = grantee
    if who == "charlie":
        user = charlie
    elif who == "superseded":
        license_publish(name="L", version="2", text="v2")
    else:
        reviews.grant_revoke(grant=grantee.grants.get(), reviewer=reviewer, reason="x")
    with pytest.raises(DemoRefused) as exc:
        create(user, demo)
    assert exc.value.status == 403
    assert (
        exc.value.code
        == {"charlie": "no_grant", "superseded": "license_not_accepted", "revoked": "revoked"}[who]
    )
    assert not DemoRequest.objects.exists()


def test_release_without_demo_is_refused(grantee, releases):
    with pytest.raises(DemoRefused, match="no demo"):
        create(grantee, releases["llama-7b"])


@override_settings(DEMO_LIMITS=LIMITS)
def test_prompt_and_params_limits(grantee, demo):
    with pytest.raises(DemoRefused, match="under 50 characters"):
        create(grantee, demo, prompt="x" * 51)
    with pytest.raises(DemoRefused, match="max_new_tokens must be between 1 and 64"):
        create(grantee, demo, max_new_tokens=65)
    with pytest.raises(DemoRefused, match="temperature"):
        create(grantee, demo, temperature=3.0)
    with pytest.raises(DemoRefused, match="Write a prompt"):
        create(grantee, demo, prompt="   ")
    assert not DemoRequest.objects.exists()


@override_settings(DEMO_LIMITS=LIMITS)
def test_concurrency_limit_and_daily_quota(grantee, demo):
    first = create(grantee, demo, max_new_tokens=30)
    create(grantee, demo, max_new_tokens=30)
    with pytest.raises(DemoRefused) as exc:
        create(grantee, demo, max_new_tokens=10)
    assert exc.value.code == "too_many" and exc.value.status == 429
    demo_request_finished(request_id=first.pk, status="done", tokens_out=30)
    # 30 used + 30 reserved + 50 asked > 100
    with pytest.raises(DemoRefused) as exc:
        create(grantee, demo, max_new_tokens=50)
    assert exc.value.code == "quota" and "40 tokens left" in str(exc.value)
    create(grantee, demo, max_new_tokens=40)
    assert DemoRequest.objects.count() == 3


def test_finish_is_recorded_once_and_purge_respects_retention(grantee, demo, settings):
    request = create(grantee, demo)
    assert demo_request_finished(
        request_id=request.pk, status="done", tokens_in=3, tokens_out=7, ttft_ms=12
    )
    assert not demo_request_finished(request_id=request.pk, status="failed", error="late")
    request.refresh_from_db()
    assert (request.status, request.tokens_out, request.error) == ("done", 7, "")
    settings.DEMO_RETENTION_DAYS = 30
    DemoRequest.objects.filter(pk=request.pk).update(created_at=timezone.now() - timedelta(days=31))
    create(grantee, demo)
    assert demo_requests_purge() == 1
    assert DemoRequest.objects.count() == 1
