"""Emails through the outbox: who gets what, exactly once, even when the broker is down."""

from __future__ import annotations

import time

import pytest
from django.core import mail
from django.test import override_settings

from access.models import Notification
from access.services import reviews
from access.services.digest import reviewer_digest_send
from access.services.notifications import notification_deliver, outbox_sweep
from portal.celery import app as celery_app

pytestmark = pytest.mark.django_db


def _by_recipient() -> dict[str, list]:
    result: dict[str, list] = {}
    for message in mail.outbox:
        for to in message.to:
            result.setdefault(to, []).append(message)
    return result


def test_submit_emails_applicant_and_reviewers(
    alice, reviewer, make_submitted, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        application = make_submitted(alice)
    sent = _by_recipient()
    assert set(sent) == {"alice@uni.example.edu", "rita@portal.example.org"}
    to_alice = sent["alice@uni.example.edu"][0]
    assert f"Application #{application.pk} received" in to_alice.subject
    assert "LLaMA 7B" in to_alice.body and f"/applications/{application.pk}/" in to_alice.body
    html = to_alice.alternatives[0]
    assert html[1] == "text/html" and "<strong>" in html[0]
    to_rita = sent["rita@portal.example.org"][0]
    assert (
        "Alice Researcher" in to_rita.subject
        and f"/admin/access/application/{application.pk}/" in to_rita.body
    )
    assert Notification.objects.filter(sent_at__isnull=True).count() == 0


@override_settings(PORTAL_REVIEWER_NOTIFICATIONS="daily")
def test_daily_digest_mode_sends_one_digest_per_reviewer_once(
    alice, bob, reviewer, make_submitted, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        make_submitted(alice)
        make_submitted(bob)
    assert set(_by_recipient()) == {"alice@uni.example.edu", "bob@lab.example.org"}
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        assert reviewer_digest_send() == 1
        assert reviewer_digest_send() == 0  # same day: nothing twice
    (digest,) = mail.outbox
    assert digest.to == ["rita@portal.example.org"]
    assert "2 applications awaiting review" in digest.subject
    assert "Alice Researcher" in digest.body and "Bob Researcher" in digest.body


def test_every_decision_and_question_emails_the_applicant(
    alice, reviewer, make_submitted, releases, django_capture_on_commit_callbacks
):
    application = make_submitted(alice)
    with django_capture_on_commit_callbacks(execute=True):
        reviews.application_request_info(
            application=application, reviewer=reviewer, question="Which group?"
        )
    assert "Which group?" in mail.outbox[-1].body and mail.outbox[-1].to == [alice.email]
    from access.services.applications import application_answer

    application_answer(application=application, applicant=alice, answer="NLP.")
    with django_capture_on_commit_callbacks(execute=True):
        reviews.application_approve(
            application=application,
            reviewer=reviewer,
            releases=[releases["llama-7b"], releases["llama-13b"]],
        )
    (approved,) = [m for m in mail.outbox if "approved" in m.subject]
    assert approved.to == [alice.email] and "approved" in approved.subject
    assert "LLaMA 7B" in approved.body and "Not granted this time: LLaMA 33B" in approved.body
    with django_capture_on_commit_callbacks(execute=True):
        reviews.application_revoke(
            application=application, reviewer=reviewer, reason="Shared publicly."
        )
    assert (
        "Shared publicly." in mail.outbox[-1].body and "revoked" in mail.outbox[-1].subject.lower()
    )


def test_rejection_email_carries_the_reason(
    alice, reviewer, make_submitted, django_capture_on_commit_callbacks
):
    application = make_submitted(alice)
    with django_capture_on_commit_callbacks(execute=True):
        reviews.application_reject(
            application=application, reviewer=reviewer, reason="We can't verify O'Brien Lab."
        )
    (message,) = mail.outbox
    assert "Reason: We can't verify O'Brien Lab." in message.body  # plain text is not HTML-escaped


def test_delivery_is_idempotent(alice, make_submitted):
    make_submitted(alice)  # on-commit hooks not run: rows are pending
    pending = list(Notification.objects.filter(sent_at__isnull=True))
    assert pending
    assert notification_deliver(notification_id=pending[0].pk) is True
    assert notification_deliver(notification_id=pending[0].pk) is False
    assert len(mail.outbox) == 1
    assert outbox_sweep() == len(pending) - 1
    assert outbox_sweep() == 0
    assert len(mail.outbox) == len(pending)


def test_failed_send_keeps_row_for_retry(alice, make_submitted):
    make_submitted(alice)
    row = Notification.objects.filter(recipient=alice.email).first()
    with (
        override_settings(EMAIL_BACKEND="tests.access.failing_mail.FailingBackend"),
        pytest.raises(ConnectionRefusedError),
    ):
        notification_deliver(notification_id=row.pk)
    row.refresh_from_db()
    assert (
        row.sent_at is None
        and row.claimed_at is None
        and "ConnectionRefusedError" in row.last_error
    )
    assert notification_deliver(notification_id=row.pk) is True


def _reset_pools() -> None:
    """Drop cached broker connections so a changed broker_url takes effect."""
    from kombu import pools

    pools.reset()
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


@pytest.fixture
def dead_broker():
    """Celery publishing to a port where nothing listens, as during a Redis outage."""
    saved = {key: celery_app.conf[key] for key in ("task_always_eager", "broker_url")}
    celery_app.conf.update(task_always_eager=False, broker_url="redis://127.0.0.1:9/0")
    _reset_pools()
    yield
    celery_app.conf.update(saved)
    _reset_pools()


def test_broker_outage_neither_fails_submission_nor_loses_mail(
    client, alice, password, license_v1, releases, dead_broker, django_capture_on_commit_callbacks
):
    from tests.conftest import FIELDS

    client.force_login(alice)
    started = time.monotonic()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/apply/",
            {
                **FIELDS,
                "requested_releases": [releases["llama-7b"].pk],
                "accept_license": "on",
                "action": "submit",
            },
        )
    assert response.status_code == 302, response.content[:500]
    assert time.monotonic() - started < 15
    assert mail.outbox == []
    assert Notification.objects.filter(recipient=alice.email, sent_at__isnull=True).count() == 1
    # The broker is back (the sweep runs in beat); everything goes out once.
    assert outbox_sweep() == 1
    assert [m.to for m in mail.outbox] == [[alice.email]]
    assert not Notification.objects.filter(sent_at__isnull=True).exists()


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_real_celery_worker_delivers_through_redis(redis_url, alice, reviewer, make_submitted):
    from celery.contrib.testing.worker import start_worker

    saved = {key: celery_app.conf[key] for key in ("task_always_eager", "broker_url")}
    celery_app.conf.update(task_always_eager=False, broker_url=redis_url)
    _reset_pools()
    try:
        with start_worker(
            celery_app, perform_ping_check=False, queues=["default", "mail"], shutdown_timeout=10
        ):
            application = make_submitted(alice)
            deadline = time.monotonic() + 30
            while (
                Notification.objects.filter(sent_at__isnull=True).exists()
                and time.monotonic() < deadline
            ):
                time.sleep(0.2)
    finally:
        celery_app.conf.update(saved)
        _reset_pools()
    assert not Notification.objects.filter(sent_at__isnull=True).exists()
    recipients = sorted(to for m in mail.outbox for to in m.to)
    assert recipients == ["alice@uni.example.edu", "rita@portal.example.org"]
    assert any(f"#{application.pk}" in m.subject for m in mail.outbox)
