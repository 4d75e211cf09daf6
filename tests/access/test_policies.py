"""can_use_release: the one access check downloads and the demo call."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser
from django.urls import reverse

from access import policies
from access.policies import can_use_release
from access.services import reviews
from access.services.licenses import license_accept, license_publish

pytestmark = pytest.mark.django_db


@pytest.fixture
def granted(alice, reviewer, make_submitted, releases):
    application = make_submitted(alice)
    reviews.application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    return application


def test_grantee_with_current_license_may_use(granted, alice, releases):
    decision = can_use_release(alice, releases["llama-7b"])
    assert decision.allowed and decision.reason == policies.ALLOWED


def test_matrix_of_refusals(granted, alice, bob, charlie, reviewer, releases, make_submitted):
    assert can_use_release(AnonymousUser(), releases["llama-7b"]).reason == policies.SIGN_IN
    assert can_use_release(charlie, releases["llama-7b"]).reason == policies.NO_GRANT
    # Requested and approved for other releases only: not granted this one.
    assert can_use_release(alice, releases["llama-13b"]).reason == policies.NO_GRANT
    make_submitted(bob, slugs=("llama-7b",))
    pending = can_use_release(bob, releases["llama-7b"])
    assert pending.reason == policies.PENDING and not pending
    reviews.application_revoke(application=granted, reviewer=reviewer, reason="Breach.")
    revoked = can_use_release(alice, releases["llama-7b"])
    assert revoked.reason == policies.REVOKED and not revoked.allowed
    alice.is_active = False
    assert can_use_release(alice, releases["llama-7b"]).reason == policies.INACTIVE


def test_new_license_version_requires_reacceptance_then_access_resumes(granted, alice, releases):
    v2 = license_publish(name="LLaMA license", version="2", text="Version 2 text.")
    decision = can_use_release(alice, releases["llama-7b"])
    assert decision.reason == policies.LICENSE_NOT_ACCEPTED
    assert "version 2" in decision.message and decision.action_url == reverse(
        "access:license_accept"
    )
    license_accept(user=alice, license_version=v2, ip_address="10.0.0.1", user_agent="pytest")
    assert can_use_release(alice, releases["llama-7b"]).allowed


def test_future_license_is_not_current_yet(granted, alice, releases):
    from django.utils import timezone

    license_publish(
        name="L",
        version="3",
        text="Later.",
        effective_from=timezone.now() + timezone.timedelta(days=7),
    )
    assert can_use_release(alice, releases["llama-7b"]).allowed


def test_acceptance_records_who_what_when_where(alice, license_v1):
    acceptance = license_accept(
        user=alice, license_version=license_v1, ip_address="192.0.2.7", user_agent="UA/1"
    )
    again = license_accept(
        user=alice, license_version=license_v1, ip_address="192.0.2.8", user_agent="UA/2"
    )
    assert again.pk == acceptance.pk
    assert (acceptance.user, acceptance.license_version, acceptance.ip_address) == (
        alice,
        license_v1,
        "192.0.2.7",
    )
    assert acceptance.accepted_at is not None


def test_license_text_hash_is_sha256_of_text(db):
    import hashlib

    version = license_publish(name="L", version="9", text="Exact text ✓")
    assert version.text_sha256 == hashlib.sha256("Exact text ✓".encode()).hexdigest()
    with pytest.raises(Exception, match="exists already"):
        license_publish(name="L", version="9", text="other")
