from __future__ import annotations

from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from access.models import Application
from access.services.applications import reviewer_emails
from access.services.notifications import notification_create


def reviewer_digest_send() -> int:
    """One email a day per reviewer listing what awaits review; keyed by date so reruns send nothing."""
    if settings.PORTAL_REVIEWER_NOTIFICATIONS != "daily":
        return 0
    waiting = list(
        Application.objects.filter(status=Application.Status.SUBMITTED)
        .select_related("applicant")
        .order_by("submitted_at")
    )
    if not waiting:
        return 0
    today = timezone.now().date().isoformat()
    items = [
        {
            "application_id": a.pk,
            "full_name": a.full_name,
            "affiliation": a.affiliation,
            "submitted_at": a.submitted_at.isoformat() if a.submitted_at else "",
            "admin_url": reverse("admin:access_application_change", args=[a.pk]),
        }
        for a in waiting
    ]
    created = 0
    for email in reviewer_emails():
        mine = [
            item for item, app in zip(items, waiting, strict=True) if app.applicant.email != email
        ]
        if not mine:
            continue
        row = notification_create(
            kind="reviewer_digest",
            recipient=email,
            context={"applications": mine, "date": today},
            dedupe_key=f"reviewer-digest:{today}:{email}",
        )
        created += row is not None
    return created
