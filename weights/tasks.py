from __future__ import annotations

from celery import shared_task

from weights.services import event_journal, fingerprinting, links, maintenance


@shared_task(acks_late=True, autoretry_for=(Exception,), retry_backoff=30, max_retries=5)
def issue_download_link(grant_id: int) -> bool:
    # Idempotent: a grant whose link was emailed already gets nothing; a fingerprinted
    # release's copies that are ready are not prepared again.
    fingerprinting.copies_prepare(grant_id=grant_id)
    return links.link_issue_and_email(grant_id=grant_id)


@shared_task
def issue_missing_links() -> int:
    issued = 0
    for grant_id in links.grants_without_link_ids():
        try:
            fingerprinting.copies_prepare(grant_id=grant_id)
            issued += links.link_issue_and_email(grant_id=grant_id)
        except Exception:  # noqa: S112 - retried on the next sweep
            continue
    return issued


@shared_task
def close_expired_links() -> int:
    # Idempotent: only links not yet revoked are closed.
    return maintenance.links_close_expired()


@shared_task
def flag_shared_links() -> int:
    # Idempotent: only links not yet flagged are flagged.
    return maintenance.links_flag_shared()


@shared_task
def flush_download_events() -> int:
    # Idempotent: each journal line carries a unique journal_id, inserted at most once.
    return event_journal.journal_flush()
