"""What every outbox table shares: rows with `claimed_at` and `attempts`, claimed with a
conditional UPDATE so that two workers (or a task and the sweep) never send one twice,
and enqueued after commit without ever failing the change that wrote them.

A claim older than PORTAL_OUTBOX_CLAIM_TIMEOUT_SECONDS belongs to a worker that died;
the row may be claimed again.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from celery import Task
from django.conf import settings
from django.db.models import F, Q, QuerySet

logger = logging.getLogger(__name__)


def unclaimed(now: datetime) -> Q:
    stale = now - timedelta(seconds=settings.PORTAL_OUTBOX_CLAIM_TIMEOUT_SECONDS)
    return Q(claimed_at__isnull=True) | Q(claimed_at__lt=stale)


def claim(rows: QuerySet, *, now: datetime) -> bool:
    """Claim the one row `rows` selects, counting an attempt; False if it is not claimable."""
    return rows.filter(unclaimed(now)).update(claimed_at=now, attempts=F("attempts") + 1) == 1


def enqueue(task: Task, row_id: int) -> None:
    try:
        task.delay(row_id)
    except Exception:
        # The row is committed; the sweep delivers it once the broker is back.
        logger.warning(
            "could not enqueue %s(%s); the sweep will retry it", task.name, row_id, exc_info=True
        )
