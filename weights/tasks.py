from __future__ import annotations

from celery import shared_task
from django.conf import settings

from weights.services import event_journal, fingerprinting, links, maintenance, stored_copies


@shared_task(acks_late=True, autoretry_for=(Exception,), retry_backoff=30, max_retries=5)
def issue_download_link(grant_id: int) -> bool:
    # Idempotent: a grant whose link was emailed already gets nothing. A fingerprinted
    # release's link waits for the grantee's own copy, which its own task prepares (a 65B
    # release takes far longer than this task's time limit) and then comes back here.
    if fingerprinting.copies_pending(grant_id):
        prepare_recipient_copies.delay(grant_id)
        return False
    return links.link_issue_and_email(grant_id=grant_id)


@shared_task(
    acks_late=True,
    autoretry_for=(Exception,),
    retry_backoff=60,
    max_retries=10,
    soft_time_limit=settings.WEIGHTS_FINGERPRINT_PREPARE_LIMIT_S,
    time_limit=settings.WEIGHTS_FINGERPRINT_PREPARE_LIMIT_S + 60,
)
def prepare_recipient_copies(grant_id: int) -> int:
    # Idempotent and restartable: each file's row commits on its own and a ready one is
    # never redone. One run per grant at a time: the sweep asks again while a long run goes.
    with fingerprinting.preparing(grant_id) as mine:
        if not mine:
            return 0
        prepared = fingerprinting.copies_prepare(grant_id=grant_id)
    if not fingerprinting.copies_pending(grant_id):
        issue_download_link.delay(grant_id)
    return prepared


@shared_task
def issue_missing_links() -> int:
    """Grants whose link never went out (broker down, worker killed): issue it now, or
    start preparing the grantee's copy first. Returns how many links were emailed here."""
    issued = 0
    for grant_id in links.grants_without_link_ids():
        try:
            issued += issue_download_link(grant_id)
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


@shared_task
def delete_revoked_copies() -> int:
    # Idempotent: a key is cleared only after its object is deleted, and deleting twice is
    # harmless; what fails stays for the next run.
    return stored_copies.revoked_copies_delete()
