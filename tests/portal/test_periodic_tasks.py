"""Celery beat's tasks: each one's effect, and that a second run changes nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone
from django.utils.module_loading import import_string

from access.models import Application, Grant, Notification
from access.services import reminders
from access.services.notifications import notification_create
from access.services.reviews import application_approve
from access.tasks import remind_reviewers, sweep_outbox
from inference_demo.models import DemoRequest
from inference_demo.tasks import purge_demo_requests
from weights.models import DownloadEvent, DownloadLink
from weights.services import maintenance
from weights.services.links import link_issue
from weights.tasks import close_expired_links, flag_shared_links


def test_every_scheduled_task_exists(settings):
    names = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert {
        "access.tasks.sweep_outbox",
        "access.tasks.remind_reviewers",
        "weights.tasks.close_expired_links",
        "weights.tasks.flag_shared_links",
        "inference_demo.tasks.purge_demo_requests",
    } <= names
    for name in names:
        assert import_string(name).name == name


# --- reviewer reminders ----------------------------------------------------------------


def _age(application: Application, days: float) -> None:
    Application.objects.filter(pk=application.pk).update(
        submitted_at=timezone.now() - timedelta(days=days)
    )


def _reminders() -> list:
    return [m for m in mail.outbox if "Waiting" in m.subject]


def test_reviewers_are_reminded_once_a_day_of_overdue_applications(
    settings, alice, bob, reviewer, make_submitted, django_capture_on_commit_callbacks, monkeypatch
):
    settings.PORTAL_REVIEW_REMINDER_DAYS = 3
    old = make_submitted(alice)
    _age(old, 4)
    _age(make_submitted(bob), 1)  # not overdue yet
    mail.outbox.clear()

    with django_capture_on_commit_callbacks(execute=True):
        assert remind_reviewers.delay().get() == 1
    (message,) = _reminders()
    assert message.to == [reviewer.email]
    assert f"application #{old.pk}" in message.subject and "Waiting 4 days" in message.subject
    assert f"/admin/access/application/{old.pk}/change/" in message.body
    assert "LLaMA 7B" in message.body

    with django_capture_on_commit_callbacks(execute=True):
        assert remind_reviewers.delay().get() == 0  # same day: nothing more
    assert len(_reminders()) == 1

    tomorrow = timezone.now() + timedelta(days=1)
    monkeypatch.setattr(reminders, "_now", lambda: tomorrow)
    with django_capture_on_commit_callbacks(execute=True):
        assert remind_reviewers.delay().get() == 1
    assert len(_reminders()) == 2
    assert Notification.objects.filter(kind="reviewer_reminder").count() == 2


def test_decided_applications_and_disabled_reminders_send_nothing(
    settings, alice, reviewer, make_submitted, releases
):
    settings.PORTAL_REVIEW_REMINDER_DAYS = 3
    application = make_submitted(alice)
    _age(application, 10)
    settings.PORTAL_REVIEW_REMINDER_DAYS = 0
    assert reminders.reviewer_reminders_send() == 0
    settings.PORTAL_REVIEW_REMINDER_DAYS = 3
    application_approve(application=application, reviewer=reviewer, releases=[releases["llama-7b"]])
    assert reminders.reviewer_reminders_send() == 0
    assert not Notification.objects.filter(kind="reviewer_reminder").exists()


# --- download links ----------------------------------------------------------------------


@pytest.fixture
def grants(alice, bob, reviewer, make_submitted, releases):
    result = []
    for user in (alice, bob):
        application = make_submitted(user, slugs=("llama-7b",))
        result += application_approve(
            application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
        )
    return result


def _expire(link: DownloadLink, ago: timedelta) -> None:
    DownloadLink.objects.filter(pk=link.pk).update(expires_at=timezone.now() - ago)


def test_expired_links_are_closed_after_the_grace_period(settings, client, grants):
    settings.WEIGHTS_EXPIRED_LINK_GRACE_HOURS = 24
    long_ago = link_issue(grant=grants[0])
    just_now = link_issue(grant=grants[1])
    _expire(long_ago.link, timedelta(days=2))
    _expire(just_now.link, timedelta(hours=1))
    live = link_issue(grant=grants[1], lifetime=timedelta(hours=5))  # replaces just_now

    assert close_expired_links.delay().get() == 1
    closed = DownloadLink.objects.get(pk=long_ago.link.pk)
    assert closed.revoked_at == closed.expires_at and closed.revoke_reason == maintenance.EXPIRED
    assert client.get(long_ago.path).status_code == 410  # still "expired", with the fresh-link hint
    assert DownloadLink.objects.get(pk=live.link.pk).revoked_at is None
    assert client.get(live.path).status_code == 200
    assert close_expired_links.delay().get() == 0


def test_within_the_grace_period_the_page_still_says_expired(settings, client, grants):
    settings.WEIGHTS_EXPIRED_LINK_GRACE_HOURS = 24
    issued = link_issue(grant=grants[0])
    _expire(issued.link, timedelta(hours=1))
    assert close_expired_links.delay().get() == 0
    assert client.get(issued.path).status_code == 410


def _events(link: DownloadLink, addresses: list[str], *, ago: timedelta = timedelta(0)) -> None:
    DownloadEvent.objects.bulk_create(
        DownloadEvent(
            link=link,
            user=link.grant.user,
            ip_address=ip,
            status_code=200,
            outcome=DownloadEvent.Outcome.SERVED,
            bytes=10,
            created_at=timezone.now() - ago,
        )
        for ip in addresses
    )


def test_links_used_from_too_many_addresses_are_flagged(settings, grants, releases, charlie):
    settings.WEIGHTS_LINK_MAX_IPS = 5
    settings.WEIGHTS_LINK_FLAG_WINDOW_HOURS = 48
    ips = [f"192.0.2.{n}" for n in range(1, 10)]
    # Six addresses on one link (written past the inline check, as racing requests are).
    shared = link_issue(grant=grants[0]).link
    _events(shared, ips[:6])
    # Bob spreads six addresses over two fresh links of one grant: three each.
    first = link_issue(grant=grants[1]).link
    _events(first, ips[:3])
    second = link_issue(grant=grants[1]).link
    _events(second, ips[3:6])
    # Five addresses now, and more only long ago: within the rule.
    fine_grant = Grant.objects.create(
        user=charlie,
        release=releases["llama-13b"],
        application=grants[0].application,
        license_version=grants[0].license_version,
        granted_by=grants[0].granted_by,
    )
    fine = link_issue(grant=fine_grant).link
    _events(fine, ips[:5])
    _events(fine, ips[5:], ago=timedelta(days=5))

    assert flag_shared_links.delay().get() == 3
    flagged = set(
        DownloadLink.objects.filter(flagged_at__isnull=False).values_list("pk", flat=True)
    )
    assert flagged == {shared.pk, first.pk, second.pk}
    assert flag_shared_links.delay().get() == 0


# --- existing sweeps: demo purge and outbox ------------------------------------------------


def test_demo_records_past_retention_are_purged(settings, alice, releases):
    settings.DEMO_RETENTION_DAYS = 30
    old = DemoRequest.objects.create(
        user=alice,
        release=releases["llama-7b"],
        prompt="old",
        created_at=timezone.now() - timedelta(days=31),
    )
    recent = DemoRequest.objects.create(user=alice, release=releases["llama-7b"], prompt="new")
    assert purge_demo_requests.delay().get() == 1
    assert not DemoRequest.objects.filter(pk=old.pk).exists()
    assert DemoRequest.objects.filter(pk=recent.pk).exists()
    assert purge_demo_requests.delay().get() == 0


def test_the_outbox_sweep_sends_undelivered_rows_once(db):
    row = notification_create(
        kind="reviewer_digest",
        recipient="rita@portal.example.org",
        context={"applications": [], "date": "2025-01-01"},
    )
    mail.outbox.clear()  # the on-commit delivery never ran (rolled-back test transaction)
    assert sweep_outbox.delay().get() == 1
    assert len(mail.outbox) == 1 and Notification.objects.get(pk=row.pk).is_sent()
    assert sweep_outbox.delay().get() == 0 and len(mail.outbox) == 1
