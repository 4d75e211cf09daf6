from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from weights.models import Artifact, DownloadEvent, DownloadLink


def download_event_record(
    *,
    link: DownloadLink | None,
    user: AbstractBaseUser | None,
    artifact: Artifact | None,
    ip_address: str | None,
    user_agent: str,
    range_header: str,
    nbytes: int,
    status_code: int,
    outcome: str,
) -> DownloadEvent:
    """Record one request; flag the link for reviewers once too many addresses used it."""
    event = DownloadEvent.objects.create(
        link=link,
        user=user,
        artifact=artifact,
        ip_address=ip_address,
        user_agent=user_agent[:300],
        range_header=range_header[:200],
        bytes=nbytes,
        status_code=status_code,
        outcome=outcome,
    )
    if link is not None and ip_address and link.flagged_at is None and _new_address(event):
        addresses = (
            DownloadEvent.objects.filter(link=link, ip_address__isnull=False)
            .values("ip_address")
            .distinct()
            .count()
        )
        if addresses > settings.WEIGHTS_LINK_MAX_IPS:
            DownloadLink.objects.filter(pk=link.pk, flagged_at__isnull=True).update(
                flagged_at=timezone.now()
            )
    return event


def _new_address(event: DownloadEvent) -> bool:
    """Only a first request from an address can push a link over the limit."""
    return not (
        DownloadEvent.objects.filter(link_id=event.link_id, ip_address=event.ip_address)
        .exclude(pk=event.pk)
        .exists()
    )
