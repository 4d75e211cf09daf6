"""Celery tasks take ids and call services; each is safe to run twice."""

from __future__ import annotations

from celery import shared_task

from access.services import notifications, webhooks
from access.services.digest import reviewer_digest_send
from access.services.reminders import reviewer_reminders_send


@shared_task(acks_late=True, autoretry_for=(Exception,), retry_backoff=30, max_retries=5)
def deliver_notification(notification_id: int) -> bool:
    # Idempotent: the service claims the row with a conditional UPDATE.
    return notifications.notification_deliver(notification_id=notification_id)


@shared_task
def sweep_outbox() -> int:
    return notifications.outbox_sweep()


@shared_task
def send_reviewer_digest() -> int:
    return reviewer_digest_send()


@shared_task
def remind_reviewers() -> int:
    # Idempotent: one outbox row per application, reviewer and day (dedupe key).
    return reviewer_reminders_send()


@shared_task(acks_late=True)
def deliver_webhook(delivery_id: int) -> bool:
    # Idempotent: the service claims the row with a conditional UPDATE. No Celery retries:
    # a failure is recorded on the row, which sweep_webhooks sends again after its backoff.
    return webhooks.delivery_attempt(delivery_id=delivery_id)


@shared_task
def sweep_webhooks() -> int:
    return webhooks.webhook_sweep()


@shared_task(acks_late=True)
def apply_approval_policies(application_id: int) -> str:
    # Idempotent: acts only on a submitted application, and writes one "held" event per run
    # of the queue (access.services.approval_policies).
    from access.services.approval_policies import policies_apply

    return policies_apply(application_id)
