"""The outbox: notifications are rows written with the change that causes them.

Delivery is enqueued after commit; if the broker is down the row stays unsent and
the periodic sweep delivers it later. Delivery claims a row with a conditional
UPDATE so that two workers (or a retry) never send the same email twice.

A row that can never be delivered (a header or address that cannot be sent, a broken
template) is marked failed at its first attempt; a transient error (SMTP, network) is
retried up to PORTAL_OUTBOX_MAX_ATTEMPTS and then marked failed. The sweep never picks
a failed row again; operators see them in the admin and in portal_stats.
"""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Iterable

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.db import IntegrityError, transaction
from django.db.models import Count, Q
from django.template import TemplateDoesNotExist, TemplateSyntaxError
from django.template.loader import render_to_string
from django.utils import timezone

from access.models import Notification
from access.services import outbox
from portal.text import one_line

logger = logging.getLogger(__name__)


def _now():
    return timezone.now()


def notification_create(
    *, kind: str, recipient: str, context: dict, dedupe_key: str | None = None
) -> Notification | None:
    """Write an outbox row in the caller's transaction; schedule delivery for after commit.

    Returns None when a row with the same dedupe_key exists already.
    """
    try:
        with transaction.atomic():
            notification = Notification.objects.create(
                kind=kind, recipient=recipient, context=context, dedupe_key=dedupe_key
            )
    except IntegrityError:
        if dedupe_key and Notification.objects.filter(dedupe_key=dedupe_key).exists():
            return None
        raise
    transaction.on_commit(lambda: _enqueue_delivery(notification.pk))
    return notification


def _enqueue_delivery(notification_id: int) -> None:
    from access.tasks import deliver_notification

    outbox.enqueue(deliver_notification, notification_id)


def _claim(notification_id: int) -> bool:
    rows = Notification.objects.filter(
        pk=notification_id, sent_at__isnull=True, failed_at__isnull=True
    )
    return outbox.claim(rows, now=_now())


def render_notification(notification: Notification) -> EmailMultiAlternatives:
    context = {**notification.context, "site_url": settings.SITE_URL}
    base = f"email/{notification.kind}"
    subject = render_to_string(f"{base}_subject.txt", context)
    text = render_to_string(f"{base}.txt", context)
    html = render_to_string(f"{base}.html", context)
    message = EmailMultiAlternatives(
        subject=one_line(settings.ACCOUNT_EMAIL_SUBJECT_PREFIX + subject),
        body=text,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[notification.recipient],
    )
    message.attach_alternative(html, "text/html")
    return message


# Errors that sending the same row again cannot cure: a bad header or address
# (BadHeaderError is a ValueError), a missing or broken template, a context the
# template cannot use. Anything else (SMTP, network, a provider's API) may pass.
_PERMANENT_ERRORS = (ValueError, TypeError, LookupError, TemplateDoesNotExist, TemplateSyntaxError)


def is_permanent_error(exc: BaseException) -> bool:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        # Every recipient refused with a 5xx: the address itself is undeliverable.
        return bool(exc.recipients) and all(code >= 500 for code, _ in exc.recipients.values())
    return isinstance(exc, _PERMANENT_ERRORS)


def notification_deliver(*, notification_id: int) -> bool:
    """Send one outbox row if nobody else has. Returns True when this call sent it.

    A transient error is re-raised so the task retries; a permanent one marks the row
    failed and returns False, since retrying it would only fail again.
    """
    if not _claim(notification_id):
        return False
    notification = Notification.objects.get(pk=notification_id)
    try:
        render_notification(notification).send()
    except Exception as exc:
        permanent = is_permanent_error(exc)
        failed = permanent or notification.attempts >= settings.PORTAL_OUTBOX_MAX_ATTEMPTS
        Notification.objects.filter(pk=notification_id).update(
            claimed_at=None,
            last_error=f"{type(exc).__name__}: {exc}"[:2000],
            failed_at=_now() if failed else None,
        )
        if failed:
            logger.error(
                "notification %s failed for good after %s attempt(s): %s",
                notification_id,
                notification.attempts,
                type(exc).__name__,
            )
        else:
            logger.warning(
                "delivery of notification %s failed: %s", notification_id, type(exc).__name__
            )
        if permanent:
            return False
        raise
    Notification.objects.filter(pk=notification_id).update(sent_at=_now(), last_error="")
    return True


def outbox_retry(*, notification_ids: Iterable[int]) -> int:
    """Give failed rows a fresh set of attempts, once the cause is fixed; returns how many."""
    ids = list(
        Notification.objects.filter(
            pk__in=list(notification_ids), sent_at__isnull=True, failed_at__isnull=False
        ).values_list("pk", flat=True)
    )
    Notification.objects.filter(pk__in=ids).update(failed_at=None, attempts=0, claimed_at=None)
    for notification_id in ids:
        transaction.on_commit(lambda pk=notification_id: _enqueue_delivery(pk))
    return len(ids)


def outbox_counts() -> dict[str, int]:
    """Rows sent, still pending (to be tried again) and failed for good."""
    return Notification.objects.aggregate(
        sent=Count("pk", filter=Q(sent_at__isnull=False)),
        pending=Count("pk", filter=Q(sent_at__isnull=True, failed_at__isnull=True)),
        failed=Count("pk", filter=Q(sent_at__isnull=True, failed_at__isnull=False)),
    )


def outbox_pending_ids(*, limit: int = 500) -> list[int]:
    return list(
        Notification.objects.filter(
            sent_at__isnull=True,
            failed_at__isnull=True,
            attempts__lt=settings.PORTAL_OUTBOX_MAX_ATTEMPTS,
        )
        .filter(outbox.unclaimed(_now()))
        .order_by("created_at")
        .values_list("pk", flat=True)[:limit]
    )


def outbox_sweep() -> int:
    """Deliver every unsent row in this process; returns how many were sent now."""
    sent = 0
    for notification_id in outbox_pending_ids():
        try:
            sent += notification_deliver(notification_id=notification_id)
        except Exception:  # noqa: S112 - the row keeps its error and is retried next sweep
            continue
    return sent
