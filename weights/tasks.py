from __future__ import annotations

from celery import shared_task

from weights.services import links


@shared_task(acks_late=True, autoretry_for=(Exception,), retry_backoff=30, max_retries=5)
def issue_download_link(grant_id: int) -> bool:
    # Idempotent: a grant whose link was emailed already gets nothing.
    return links.link_issue_and_email(grant_id=grant_id)


@shared_task
def issue_missing_links() -> int:
    issued = 0
    for grant_id in links.grants_without_link_ids():
        try:
            issued += links.link_issue_and_email(grant_id=grant_id)
        except Exception:  # noqa: S112 - retried on the next sweep
            continue
    return issued
