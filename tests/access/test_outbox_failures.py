"""Outbox rows that cannot be delivered: clean headers, failed for good, shown to operators."""

from __future__ import annotations

import io
import json

import pytest
from django.core import mail
from django.core.management import call_command
from django.urls import reverse

from access.models import Application, Notification
from access.services.applications import application_save_draft, application_submit
from access.services.notifications import notification_deliver, outbox_sweep
from access.tasks import deliver_notification
from tests.conftest import FIELDS
from tests.factories import accept_license

pytestmark = pytest.mark.django_db

# Rows written before names were validated may hold anything; the subject must not.
HOSTILE_NAME = "Mallory\r\nBcc: victim@example.org\u202e\tEvil"


def _submit_with_raw_name(user, license_v1, releases, full_name: str) -> Application:
    draft = application_save_draft(
        applicant=user,
        fields={**FIELDS, "institutional_email": user.email},
        releases=[releases["llama-7b"]],
    )
    Application.objects.filter(pk=draft.pk).update(full_name=full_name)
    acceptance = accept_license(user, license_v1)
    return application_submit(application=draft, applicant=user, license_acceptance=acceptance)


def test_reviewer_notice_for_a_name_with_crlf_is_delivered_with_a_clean_subject(
    alice, reviewer, license_v1, releases, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        application = _submit_with_raw_name(alice, license_v1, releases, HOSTILE_NAME)
    (notice,) = [m for m in mail.outbox if m.to == [reviewer.email]]
    assert notice.subject == (
        f"[LLaMA access] New application #{application.pk}: Mallory Bcc: victim@example.org Evil"
    )
    headers = notice.message()
    assert headers["Subject"] == notice.subject and headers.get_all("Bcc") is None
    assert not Notification.objects.filter(sent_at__isnull=True).exists()


@pytest.fixture
def bad_rows(db):
    """One row whose address can never be a header, one whose template does not exist."""
    return [
        Notification.objects.create(
            kind="reviewer_digest",
            recipient="rita@portal.example.org\nBcc: victim@example.org",
            context={"applications": [], "date": "2025-01-01"},
        ),
        Notification.objects.create(
            kind="no_such_kind", recipient="rita@portal.example.org", context={}
        ),
    ]


def test_a_permanent_error_fails_the_row_at_once_and_the_sweep_leaves_it(bad_rows):
    header_row, template_row = bad_rows
    assert notification_deliver(notification_id=header_row.pk) is False
    assert deliver_notification.delay(template_row.pk).get() is False  # the task: no retries
    for row, error in ((header_row, "BadHeaderError"), (template_row, "TemplateDoesNotExist")):
        row.refresh_from_db()
        assert row.is_failed() and not row.is_sent(), row.last_error
        assert row.attempts == 1 and row.last_error.startswith(error)
    assert outbox_sweep() == 0
    assert list(Notification.objects.values_list("attempts", flat=True)) == [1, 1]
    assert mail.outbox == []


def test_a_transient_error_is_retried_until_max_attempts_then_failed(
    alice, make_submitted, settings
):
    settings.PORTAL_OUTBOX_MAX_ATTEMPTS = 3
    make_submitted(alice)  # on-commit hooks not run: rows are pending
    row = Notification.objects.get(recipient=alice.email)
    settings.EMAIL_BACKEND = "tests.access.failing_mail.FailingBackend"
    for attempt in (1, 2, 3):
        with pytest.raises(ConnectionRefusedError):
            notification_deliver(notification_id=row.pk)
        row.refresh_from_db()
        assert row.attempts == attempt and "ConnectionRefusedError" in row.last_error
        assert row.is_failed() == (attempt == 3)
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    outbox_sweep()
    row.refresh_from_db()
    assert row.attempts == 3 and row.is_failed() and not row.is_sent()
    assert alice.email not in [to for m in mail.outbox for to in m.to]


def test_operators_see_failed_rows_in_the_admin_and_can_retry_them(
    reviewer_client, bad_rows, alice, make_submitted, django_capture_on_commit_callbacks
):
    make_submitted(alice)
    for row in bad_rows:
        notification_deliver(notification_id=row.pk)
    changelist = reverse("admin:access_notification_changelist")
    failed = reviewer_client.get(changelist, {"sent": "failed"})
    assert {n.pk for n in failed.context["cl"].result_list} == {r.pk for r in bad_rows}
    assert "TemplateDoesNotExist: email/no_such_kind_subject.txt" in failed.content.decode()
    pending = reviewer_client.get(changelist, {"sent": "no"}).context["cl"].result_list
    assert pending and not {n.pk for n in pending} & {r.pk for r in bad_rows}

    fixed = bad_rows[0]
    Notification.objects.filter(pk=fixed.pk).update(recipient="rita@portal.example.org")
    with django_capture_on_commit_callbacks(execute=True):
        response = reviewer_client.post(
            changelist, {"action": "retry_selected", "_selected_action": [fixed.pk]}
        )
    assert response.status_code == 302
    fixed.refresh_from_db()
    assert fixed.is_sent() and not fixed.is_failed() and fixed.attempts == 1
    assert [m.to for m in mail.outbox] == [["rita@portal.example.org"]]


def test_portal_stats_counts_failed_notifications(bad_rows, alice, reviewer, make_submitted):
    make_submitted(alice)  # two pending rows: alice's receipt and rita's notice
    for row in bad_rows:
        notification_deliver(notification_id=row.pk)
    pending = Notification.objects.filter(failed_at__isnull=True).first()
    notification_deliver(notification_id=pending.pk)

    out = io.StringIO()
    call_command("portal_stats", "--json", stdout=out)
    assert json.loads(out.getvalue())["notifications"] == {"sent": 1, "pending": 1, "failed": 2}
    out = io.StringIO()
    call_command("portal_stats", stdout=out)
    assert "Notifications: 1 sent, 1 pending, 2 failed" in out.getvalue()
