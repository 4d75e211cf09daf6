"""Reactions to access events (sent after commit, with ids only)."""

from __future__ import annotations

import logging

from django.dispatch import receiver

from access.signals import grant_created, grant_revoked
from weights.services.links import links_revoke_for_grant

logger = logging.getLogger(__name__)


@receiver(grant_created)
def on_grant_created(sender, grant_id: int, **kwargs) -> None:
    from weights.tasks import issue_download_link

    try:
        issue_download_link.delay(grant_id)
    except Exception:
        logger.warning(
            "could not enqueue link for grant %s; the sweep will issue it", grant_id, exc_info=True
        )


@receiver(grant_revoked)
def on_grant_revoked(sender, grant_id: int, **kwargs) -> None:
    links_revoke_for_grant(grant_id=grant_id)
    from weights.tasks import delete_revoked_copies

    try:  # a fingerprinted copy written to storage goes now, not at the next sweep
        delete_revoked_copies.delay()
    except Exception:
        logger.warning("could not enqueue deleting revoked copies; the sweep will", exc_info=True)
