"""Webhooks end to end: real transitions, a real HTTP receiver on loopback, real commits.

Assertions are on what the receiver got (headers, bytes, signatures checked with the
snippet printed in docs/webhooks.md) and on the outbox rows and their attempt log.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta

import pytest
from django.conf import settings as django_settings
from django.core import mail
from django.db import transaction
from django.utils import timezone

from access import webhook_signing
from access.models import LicenseAcceptance, WebhookDelivery, WebhookEndpoint, WebhookEventType
from access.services import applications, reviews, webhooks
from access.services.webhooks import webhook_sweep
from tests.access.webhook_receiver import documented_verify, receiving
from tests.conftest import FIELDS
from tests.servers import free_port

Status = WebhookDelivery.Status
ALL_EVENTS = list(WebhookEventType.values)


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def receiver():
    with receiving() as running:
        yield running


def endpoint_for(url: str, events=ALL_EVENTS, **fields) -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(url=url, event_types=list(events), **fields)


def time_passes(delivery: WebhookDelivery) -> None:
    """The delivery's backoff is over."""
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )


def assert_signed(request, endpoint: WebhookEndpoint) -> None:
    assert documented_verify()(endpoint.secret, request.body, request.headers["X-Portal-Signature"])


# --- a real transition reaches a real receiver, after commit ---------------------------


@pytest.mark.django_db(transaction=True)
def test_a_submission_and_an_approval_reach_the_receiver_signed_and_without_secrets(
    receiver, alice, reviewer, make_submitted, releases
):
    endpoint = endpoint_for(receiver.url())
    application = make_submitted(alice, slugs=("llama-7b", "llama-13b"))

    (submitted,) = receiver.received
    assert submitted.path == "/hook"
    assert_signed(submitted, endpoint)
    row = WebhookDelivery.objects.get()
    assert submitted.headers["Content-Type"] == "application/json"
    assert submitted.headers["X-Portal-Event"] == "application.submitted"
    assert submitted.headers["X-Portal-Delivery"] == str(row.uuid)
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", submitted.headers["X-Portal-Signature"])
    payload = submitted.payload
    assert list(payload) == ["id", "type", "created_at", "data"]
    assert payload["id"] == str(row.uuid) and payload["type"] == "application.submitted"
    assert datetime.fromisoformat(payload["created_at"]) == row.created_at
    assert payload["data"] == {
        "application_id": application.pk,
        "application_event_id": application.events.get(action="submitted").pk,
        "status": "submitted",
        "previous_status": "draft",
        "actor_id": alice.pk,
        "actor_label": "",
        "policy_rule_id": None,
        "applicant": {"id": alice.pk, "email": alice.email},
        "requested_releases": ["llama-13b", "llama-7b"],
        "releases": ["llama-13b", "llama-7b"],
        "admin_url": f"{django_settings.SITE_URL}/admin/access/application/{application.pk}/change/",
    }
    row.refresh_from_db()
    assert row.status == Status.DELIVERED and row.attempts == 1 and row.delivered_at
    (attempt,) = row.attempt_log.all()
    assert attempt.response_status == 204 and attempt.error == "" and attempt.duration_ms >= 0

    [grant] = reviews.application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    assert receiver.types() == ["application.submitted", "application.approved"]
    approved = receiver.received[1]
    assert_signed(approved, endpoint)
    assert approved.payload["data"]["releases"] == ["llama-7b"]
    assert approved.payload["data"]["grants"] == [{"id": grant.pk, "release": "llama-7b"}]
    assert approved.payload["data"]["actor_id"] == reviewer.pk

    # The approval emailed a download link; its token is in no webhook body.
    (link_mail,) = [m for m in mail.outbox if "/d/" in m.body]
    token = re.search(r"/d/([^/\s]+)/", link_mail.body).group(1)
    for request in receiver.received:
        assert token.encode() not in request.body
        assert endpoint.secret.encode() not in request.body
        assert b"whsec_" not in request.body
        assert django_settings.SECRET_KEY.encode() not in request.body


@pytest.mark.django_db(transaction=True)
def test_nothing_is_sent_before_commit_and_a_rolled_back_change_sends_nothing(
    receiver, alice, bob, make_submitted
):
    endpoint_for(receiver.url())
    with transaction.atomic():
        make_submitted(alice)
        assert WebhookDelivery.objects.filter(status=Status.PENDING).count() == 1
        assert receiver.received == []
    assert receiver.types() == ["application.submitted"]

    with pytest.raises(RuntimeError), transaction.atomic():
        make_submitted(bob)
        raise RuntimeError("the change fails after the event was written")
    assert WebhookDelivery.objects.count() == 1
    assert receiver.types() == ["application.submitted"]
    assert webhook_sweep() == 0


# --- a receiver that is down, retries, the maximum --------------------------------------


def test_a_receiver_that_is_down_gets_the_event_once_it_is_back(
    alice, make_submitted, django_capture_on_commit_callbacks
):
    port = free_port()
    endpoint = endpoint_for(f"http://127.0.0.1:{port}/hook")
    with django_capture_on_commit_callbacks(execute=True):
        make_submitted(alice)
    row = WebhookDelivery.objects.get()
    assert row.status == Status.PENDING and row.attempts == 1
    assert row.last_response_status is None and "ConnectionRefusedError" in row.last_error
    (refused,) = row.attempt_log.all()
    assert refused.error == row.last_error and refused.response_status is None
    assert row.next_attempt_at - refused.started_at >= timedelta(seconds=30)
    assert webhook_sweep() == 0  # not due yet

    with receiving(port) as receiver:
        time_passes(row)
        assert webhook_sweep() == 1
        assert webhook_sweep() == 0
        time_passes(row)
        assert webhook_sweep() == 0
        assert webhooks.delivery_attempt(delivery_id=row.pk) is False
    (request,) = receiver.received
    assert request.headers["X-Portal-Delivery"] == str(row.uuid)
    assert_signed(request, endpoint)
    row.refresh_from_db()
    assert row.status == Status.DELIVERED and row.attempts == 2 and row.last_error == ""
    assert [(a.number, a.response_status) for a in row.attempt_log.all()] == [(1, None), (2, 204)]


def test_failed_attempts_back_off_exponentially_and_stop_at_the_maximum(
    alice, make_submitted, settings
):
    settings.PORTAL_WEBHOOK_MAX_ATTEMPTS = 3
    with receiving(status=500, answer=b"x" * 5000) as receiver:
        endpoint_for(receiver.url())
        make_submitted(alice)  # on-commit hooks not run: the row is pending
        row = WebhookDelivery.objects.get()
        waits = []
        for _ in range(3):
            time_passes(row)
            assert webhook_sweep() == 1
            row.refresh_from_db()
            waits.append(row.next_attempt_at - row.attempt_log.last().started_at)
        assert webhook_sweep() == 0
        time_passes(row)
        assert webhook_sweep() == 0
    assert len(receiver.received) == 3
    assert len({r.headers["X-Portal-Delivery"] for r in receiver.received}) == 1
    row.refresh_from_db()
    assert row.status == Status.FAILED and row.failed_at and row.attempts == 3
    assert row.last_response_status == 500
    assert timedelta(seconds=30) <= waits[0] < timedelta(seconds=35)
    assert timedelta(seconds=60) <= waits[1] < timedelta(seconds=65)
    attempts = list(row.attempt_log.all())
    assert [a.response_status for a in attempts] == [500, 500, 500]
    assert all(a.response_body == "x" * webhooks.RESPONSE_SNIPPET_BYTES for a in attempts)


def test_backoff_doubles_and_is_capped(settings):
    settings.PORTAL_WEBHOOK_BACKOFF_BASE_SECONDS = 30
    assert [webhooks.backoff(n).total_seconds() for n in range(1, 6)] == [30, 60, 120, 240, 480]
    assert webhooks.backoff(40) == webhooks.MAX_BACKOFF


@pytest.mark.parametrize("status", [302, 404, 410])
def test_an_answer_that_is_not_2xx_is_retried_and_a_redirect_is_not_followed(
    alice, make_submitted, status
):
    with receiving(status=status) as target:
        endpoint_for(target.url())
        make_submitted(alice)
        row = WebhookDelivery.objects.get()
        assert webhooks.delivery_attempt(delivery_id=row.pk) is False
        row.refresh_from_db()
        assert row.status == Status.PENDING and row.last_response_status == status
        # A 3xx pointing elsewhere: the target never gets a GET that would count as delivered.
        target.status = 200
        with receiving(status=301, location=target.url("/elsewhere")) as redirector:
            WebhookEndpoint.objects.update(url=redirector.url())
            time_passes(row)
            assert webhooks.delivery_attempt(delivery_id=row.pk) is False
    row.refresh_from_db()
    assert row.last_response_status == 301 and row.status == Status.PENDING
    assert [r.method for r in target.received] == ["POST"]
    assert [r.method for r in redirector.received] == ["POST"]


def test_a_receiver_that_does_not_answer_in_time_is_recorded_as_a_timeout(
    alice, make_submitted, settings
):
    import socket

    settings.PORTAL_WEBHOOK_TIMEOUT_SECONDS = 1
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint_for(f"http://127.0.0.1:{silent.getsockname()[1]}/")
        make_submitted(alice)
        row = WebhookDelivery.objects.get()
        started = time.monotonic()
        assert webhooks.delivery_attempt(delivery_id=row.pk) is False
        assert time.monotonic() - started < 5
    row.refresh_from_db()
    assert row.status == Status.PENDING and "timed out" in row.last_error
    assert row.attempt_log.get().duration_ms >= 900


# --- signatures -------------------------------------------------------------------------

VERIFIERS = {"module": webhook_signing.verify, "docs": documented_verify()}
SECRET = "whsec_test-secret"
BODY = b'{"id":"x","type":"ping","created_at":"2026-01-01T00:00:00+00:00","data":{}}'


@pytest.mark.parametrize("verify", VERIFIERS.values(), ids=VERIFIERS.keys())
def test_verify_accepts_a_fresh_signature_and_refuses_stale_modified_or_forged_ones(verify):
    now = int(time.time())
    assert verify(SECRET, BODY, webhook_signing.sign(SECRET, BODY, now))
    assert verify(SECRET, BODY, webhook_signing.sign(SECRET, BODY, now - 290))
    assert not verify(SECRET, BODY, webhook_signing.sign(SECRET, BODY, now - 301))  # replayed
    assert not verify(SECRET, BODY, webhook_signing.sign(SECRET, BODY, now + 301))
    assert verify(SECRET, BODY, webhook_signing.sign(SECRET, BODY, now - 500), tolerance=600)
    assert not verify(SECRET, BODY + b" ", webhook_signing.sign(SECRET, BODY, now))
    assert not verify(
        SECRET, BODY.replace(b"ping", b"pong"), webhook_signing.sign(SECRET, BODY, now)
    )
    assert not verify("whsec_other", BODY, webhook_signing.sign(SECRET, BODY, now))
    # The timestamp is signed: moving it to now breaks the signature.
    stale = webhook_signing.sign(SECRET, BODY, now - 3600)
    assert not verify(SECRET, BODY, re.sub(r"t=\d+", f"t={now}", stale))
    signature = webhook_signing.signature(SECRET, BODY, now)
    for header in ["", "t=,v1=", f"v1={signature}", f"t={now}", f"t=१२३,v1={signature}",
                   f"t={now},v1=ü{signature[1:]}", f"t={now},v0={signature}", "garbage"]:  # fmt: skip
        assert not verify(SECRET, BODY, header), header
    assert verify(SECRET, BODY, f" t={now} , v1={'0' * 64}, v1={signature}")


@pytest.mark.parametrize("verify", VERIFIERS.values(), ids=VERIFIERS.keys())
def test_after_a_rotation_either_secret_verifies_until_the_grace_period_ends(verify):
    now = int(time.time())
    header = webhook_signing.sign("whsec_new", BODY, now, previous_secret="whsec_old")
    assert header.count("v1=") == 2
    assert verify("whsec_new", BODY, header) and verify("whsec_old", BODY, header)
    assert not verify("whsec_other", BODY, header)


# --- which endpoints get what -----------------------------------------------------------


def test_an_endpoint_gets_only_what_it_subscribes_to_and_an_inactive_one_nothing(
    alice, reviewer, make_submitted, releases, django_capture_on_commit_callbacks
):
    with receiving() as receiver:
        approvals = endpoint_for(receiver.url("/approvals"), events=["application.approved"])
        everything = endpoint_for(receiver.url("/everything"))
        endpoint_for(receiver.url("/inactive"), is_active=False)
        with django_capture_on_commit_callbacks(execute=True):
            application = make_submitted(alice)
        with django_capture_on_commit_callbacks(execute=True):
            reviews.application_approve(
                application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
            )
        assert webhook_sweep() == 0
    got = [(r.path, r.payload["type"]) for r in receiver.received]
    assert got == [
        ("/everything", "application.submitted"),
        ("/approvals", "application.approved"),
        ("/everything", "application.approved"),
    ]
    by_path = {r.path: r for r in receiver.received}
    assert_signed(by_path["/approvals"], approvals)
    assert_signed(by_path["/everything"], everything)
    assert not documented_verify()(
        approvals.secret,
        by_path["/everything"].body,
        by_path["/everything"].headers["X-Portal-Signature"],
    )
    assert not WebhookDelivery.objects.filter(endpoint__is_active=False).exists()


def test_with_no_endpoint_a_transition_writes_no_delivery(alice, make_submitted):
    WebhookEndpoint.objects.create(
        url="https://example.org/hook", event_types=ALL_EVENTS, is_active=False
    )
    make_submitted(alice)
    assert not WebhookDelivery.objects.exists()


def submit_again(user, releases):
    """A new application from someone who accepted the license already."""
    draft = applications.application_save_draft(
        applicant=user,
        fields={**FIELDS, "institutional_email": user.email},
        releases=[releases["llama-7b"], releases["llama-13b"]],
    )
    return applications.application_submit(
        application=draft,
        applicant=user,
        license_acceptance=LicenseAcceptance.objects.get(user=user),
    )


def test_every_transition_maps_to_its_event_and_drafts_stay_private(
    alice, bob, reviewer, make_submitted, releases, license_v1
):
    endpoint_for("https://example.org/hook")
    draft = applications.application_save_draft(applicant=bob, fields={"full_name": "Bob"})
    applications.application_withdraw(application=draft, applicant=bob)

    application = make_submitted(alice)
    reviews.application_request_info(application=application, reviewer=reviewer, question="Why?")
    applications.application_answer(application=application, applicant=alice, answer="Because.")
    reviews.application_reject(application=application, reviewer=reviewer, reason="No.")

    second = submit_again(alice, releases)
    applications.application_withdraw(application=second, applicant=alice)

    third = submit_again(alice, releases)
    grants = reviews.application_approve(
        application=third, reviewer=reviewer, releases=[releases["llama-7b"], releases["llama-13b"]]
    )
    reviews.application_revoke(application=third, reviewer=reviewer, reason="Breach.")

    rows = list(WebhookDelivery.objects.order_by("pk"))
    assert [row.event_type for row in rows] == [
        "application.submitted",
        "application.answered",
        "application.rejected",
        "application.submitted",
        "application.withdrawn",
        "application.submitted",
        "application.approved",
        "grant.revoked",
        "grant.revoked",
        "application.revoked",
    ]
    assert {
        row.data["application_id"] for row in rows if row.event_type.startswith("application.")
    } == {application.pk, second.pk, third.pk}
    revoked_grants = [row.data for row in rows if row.event_type == "grant.revoked"]
    assert sorted(d["grant_id"] for d in revoked_grants) == sorted(g.pk for g in grants)
    assert {d["release"] for d in revoked_grants} == {"llama-7b", "llama-13b"}
    assert revoked_grants[0]["user"] == {"id": alice.pk, "email": alice.email}
    assert revoked_grants[0]["admin_url"].startswith(
        f"{django_settings.SITE_URL}/admin/access/grant/"
    )
    assert rows[-1].data["releases"] == ["llama-13b", "llama-7b"]


def test_a_grant_revoked_on_its_own_is_an_event(alice, reviewer, make_submitted, releases):
    endpoint_for("https://example.org/hook", events=["grant.revoked"])
    application = make_submitted(alice)
    [grant] = reviews.application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    reviews.grant_revoke(grant=grant, reviewer=reviewer, reason="Shared the weights.")
    (row,) = WebhookDelivery.objects.all()
    grant.refresh_from_db()
    assert row.event_type == "grant.revoked"
    assert row.data == {
        "grant_id": grant.pk,
        "application_id": application.pk,
        "release": "llama-7b",
        "user": {"id": alice.pk, "email": alice.email},
        "revoked_at": grant.revoked_at.isoformat(),
        "revoked_by_id": reviewer.pk,
        "admin_url": f"{django_settings.SITE_URL}/admin/access/grant/{grant.pk}/change/",
    }


def test_the_scheduled_sweep_sends_what_a_broker_outage_left_behind(
    alice, make_submitted, settings, monkeypatch, django_capture_on_commit_callbacks
):
    from access import tasks

    entry = settings.CELERY_BEAT_SCHEDULE["retry-due-webhook-deliveries"]
    assert entry == {"task": "access.tasks.sweep_webhooks", "schedule": 60.0}

    def broker_down(*args, **kwargs):
        raise ConnectionRefusedError("broker down")

    with receiving() as receiver:
        endpoint_for(receiver.url())
        with monkeypatch.context() as patched:
            patched.setattr(tasks.deliver_webhook, "delay", broker_down)
            with django_capture_on_commit_callbacks(execute=True):
                make_submitted(alice)  # the submission succeeds all the same
        row = WebhookDelivery.objects.get()
        assert row.status == Status.PENDING and row.attempts == 0 and receiver.received == []
        assert tasks.sweep_webhooks.delay().get() == 1
        assert tasks.sweep_webhooks.delay().get() == 0
    assert receiver.types() == ["application.submitted"]
    row.refresh_from_db()
    assert row.status == Status.DELIVERED and row.attempts == 1


def test_an_answer_is_stored_bounded_and_storable_whatever_its_bytes(alice, make_submitted):
    with receiving(status=500, answer=b"\x00\xff\xfe oops" + b"y" * 4000) as receiver:
        endpoint_for(receiver.url())
        make_submitted(alice)
        row = WebhookDelivery.objects.get()
        assert webhooks.delivery_attempt(delivery_id=row.pk) is False
    attempt = row.attempt_log.get()
    assert attempt.response_status == 500
    assert attempt.response_body.startswith("\ufffd\ufffd\ufffd oops")
    assert len(attempt.response_body) == webhooks.RESPONSE_SNIPPET_BYTES
