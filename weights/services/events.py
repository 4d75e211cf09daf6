"""Download events: one per file request, written in batches (weights.services.event_journal).

The batch insert also flags a link once more than `WEIGHTS_LINK_MAX_IPS` addresses used it;
`maintenance.links_flag_shared` re-checks periodically.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from weights.models import Artifact, DownloadLink
from weights.services import event_journal


def _now() -> datetime:
    return timezone.now()


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
) -> None:
    """Journal one request, timed now. No queries: a request must not wait on the database
    for its own accounting (unless WEIGHTS_EVENT_BATCH is 1, when the row is inserted here)."""
    event_journal.journal_record(
        {
            "journal_id": str(uuid.uuid4()),
            "created_at": _now().isoformat(),
            "link_id": link.pk if link is not None else None,
            "user_id": user.pk if user is not None else None,
            "artifact_id": artifact.pk if artifact is not None else None,
            "ip_address": ip_address or None,
            "user_agent": user_agent[:300],
            "range_header": range_header[:200],
            "bytes": nbytes,
            "status_code": status_code,
            "outcome": outcome,
        }
    )
