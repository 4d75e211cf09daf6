"""Periodic upkeep of download links: close expired ones, flag shared ones.

Closing expired links. Every request already refuses a link past `expires_at`; the
sweep makes that state explicit so that the admin's "Live" filter, My downloads and
`rotate_links` see only links that still work. An expired link is revoked with
`revoked_at = expires_at` (the moment it actually stopped working) and the reason
`EXPIRED`, once `WEIGHTS_EXPIRED_LINK_GRACE_HOURS` have passed; its page keeps saying
precisely that it expired and when (link_resolve knows the reason). Byte counters (LinkUsage) and download
events are kept: they are the accounting record.

Flagging shared links. Each batch insert of download events (event_journal) flags a
link once more than `WEIGHTS_LINK_MAX_IPS` addresses used it. The periodic re-check
catches what that check cannot see: batches that raced past it, and a researcher spreading use
over several fresh links of one grant. Within `WEIGHTS_LINK_FLAG_WINDOW_HOURS` it
flags every link used from too many addresses, and every link of a grant whose links
together were.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F
from django.utils import timezone

from access.services.webhooks import links_flagged_emit
from weights.models import DownloadEvent, DownloadLink
from weights.services.links import EXPIRED_REASON

logger = logging.getLogger(__name__)

EXPIRED = EXPIRED_REASON


def _now() -> datetime:
    return timezone.now()


def links_close_expired(*, now: datetime | None = None) -> int:
    """Revoke links that expired more than the grace period ago; returns how many. Rerun-safe."""
    cutoff = (now or _now()) - timedelta(hours=settings.WEIGHTS_EXPIRED_LINK_GRACE_HOURS)
    closed = DownloadLink.objects.filter(revoked_at__isnull=True, expires_at__lte=cutoff).update(
        revoked_at=F("expires_at"), revoke_reason=EXPIRED
    )
    if closed:
        logger.info("closed %d expired download links", closed)
    return closed


def links_flag_shared(*, now: datetime | None = None) -> int:
    """Flag links used from too many addresses in the window; returns how many were newly flagged."""
    now = now or _now()
    since = now - timedelta(hours=settings.WEIGHTS_LINK_FLAG_WINDOW_HOURS)
    limit = settings.WEIGHTS_LINK_MAX_IPS
    recent = DownloadEvent.objects.filter(
        created_at__gte=since, link__isnull=False, ip_address__isnull=False
    )
    by_link = (
        recent.values("link")
        .annotate(addresses=Count("ip_address", distinct=True))
        .filter(addresses__gt=limit)
        .values_list("link", flat=True)
    )
    by_grant = (
        recent.values("link__grant")
        .annotate(addresses=Count("ip_address", distinct=True))
        .filter(addresses__gt=limit)
        .values_list("link__grant", flat=True)
    )
    of_shared_grants = recent.filter(link__grant__in=list(by_grant)).values_list("link", flat=True)
    link_ids = set(by_link) | set(of_shared_grants)
    candidates = DownloadLink.objects.filter(pk__in=link_ids, flagged_at__isnull=True)
    hints = list(candidates.values_list("token_hint", flat=True))
    with transaction.atomic():
        flagged = candidates.update(flagged_at=now)
        if flagged:
            links_flagged_emit(link_ids=link_ids, flagged_at=now)
    if flagged:
        logger.warning(
            "flagged %d download links used from more than %d addresses: %s",
            flagged,
            limit,
            ", ".join(f"{hint}…" for hint in hints),
        )
    return flagged
