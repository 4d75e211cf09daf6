"""Remind reviewers of applications that have waited too long for a decision."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from access.models import Application
from access.services.applications import reviewer_emails
from access.services.notifications import notification_create

KIND = "reviewer_reminder"


def _now() -> datetime:
    return timezone.now()


def _dedupe_key(day: str, application_id: int, email: str) -> str:
    # Emails can be long; the key column holds 200 characters.
    who = hashlib.sha256(email.lower().encode()).hexdigest()[:16]
    return f"{KIND}:{day}:{application_id}:{who}"


def overdue_applications(*, now: datetime | None = None) -> list[Application]:
    """Applications awaiting review for more than PORTAL_REVIEW_REMINDER_DAYS days, oldest first."""
    cutoff = (now or _now()) - timedelta(days=settings.PORTAL_REVIEW_REMINDER_DAYS)
    return list(
        Application.objects.filter(status__in=Application.AWAITING_REVIEW, submitted_at__lte=cutoff)
        .select_related("applicant")
        .prefetch_related("requested_releases")
        .order_by("submitted_at")
    )


def reviewer_reminders_send(*, now: datetime | None = None) -> int:
    """One reminder per overdue application, reviewer and day; reruns the same day send nothing.

    Returns how many reminders were queued in the outbox now. The applicant is never
    reminded of their own application.
    """
    if settings.PORTAL_REVIEW_REMINDER_DAYS <= 0:
        return 0
    now = now or _now()
    overdue = overdue_applications(now=now)
    if not overdue:
        return 0
    day = now.date().isoformat()
    reviewers = reviewer_emails()
    created = 0
    for application in overdue:
        context = {
            "application_id": application.pk,
            "full_name": application.full_name,
            "affiliation": application.affiliation,
            "releases": [r.name for r in application.requested_releases.all()],
            "submitted_at": application.submitted_at.date().isoformat(),
            "days_waiting": (now - application.submitted_at).days,
            "admin_url": reverse("admin:access_application_change", args=[application.pk]),
        }
        for email in reviewers:
            if email.lower() == application.applicant.email.lower():
                continue
            row = notification_create(
                kind=KIND,
                recipient=email,
                context=context,
                dedupe_key=_dedupe_key(day, application.pk, email),
            )
            created += row is not None
    return created
