"""Working the queue as a team: a reviewer claims an application while reading it.

A claim is a soft lock with an expiry (PORTAL_REVIEW_CLAIM_MINUTES): it tells the others
"someone is on it" and stops them deciding it by accident. Every change is one conditional
UPDATE, so two reviewers clicking "claim" at once cannot both win. Taking over a live claim
of someone else is allowed, but only as an explicit act (`takeover=True`), so that a
reviewer who went home does not block the queue and nobody loses a claim silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q
from django.utils import timezone

from access import errors
from access.models import Application

# A module import, not names from it: reviews may import this module in turn.
from access.services import reviews

CLAIMED_BY_OTHER = "{holder} holds this application since {since:%Y-%m-%d %H:%M} UTC; take it over explicitly to decide it."
NOT_CLAIMABLE = "Only an application awaiting a decision can be claimed; this one is {status}."
NOT_HOLDER = "You do not hold this application."
REASSIGN_TARGET = "Claims can only be handed to another reviewer who is not the applicant."


@dataclass(frozen=True)
class ClaimState:
    holder_id: int | None
    holder_email: str
    since: datetime | None

    @property
    def held(self) -> bool:
        return self.holder_id is not None


def claim_timeout() -> timedelta:
    return timedelta(minutes=settings.PORTAL_REVIEW_CLAIM_MINUTES)


def claim_cutoff(now: datetime | None = None) -> datetime:
    """Claims taken before this instant have expired."""
    return (now or timezone.now()) - claim_timeout()


def live_claim_q(now: datetime | None = None) -> Q:
    """Applications someone holds right now (a decided application is held by nobody)."""
    return Q(
        claimed_by__isnull=False,
        claimed_at__gte=claim_cutoff(now),
        status__in=reviews.DECIDABLE,
    )


def claim_of(application: Application, now: datetime | None = None) -> ClaimState:
    """Who holds `application` now; expects `claimed_by` to be loaded (select_related)."""
    live = (
        application.claimed_by_id is not None
        and application.claimed_at is not None
        and application.claimed_at >= claim_cutoff(now)
        and application.status in reviews.DECIDABLE
    )
    if not live:
        return ClaimState(None, "", None)
    holder = application.claimed_by
    return ClaimState(
        application.claimed_by_id, holder.email or str(holder), application.claimed_at
    )


def _refuse(application_id: int, reviewer: AbstractBaseUser) -> errors.ServiceError:
    """Why a conditional update matched nothing, read after the fact."""
    current = Application.objects.select_related("claimed_by").filter(pk=application_id).first()
    if current is None:
        return errors.NotFound("No such application.")
    if current.status not in reviews.DECIDABLE:
        return errors.IllegalTransition(
            NOT_CLAIMABLE.format(status=current.get_status_display().lower()),
            code="not_claimable",
        )
    state = claim_of(current)
    if state.held and state.holder_id != reviewer.pk:
        return errors.IllegalTransition(
            CLAIMED_BY_OTHER.format(holder=state.holder_email, since=state.since),
            code="claimed_by_other",
        )
    return errors.NotAllowed(NOT_HOLDER, code="not_holder")


def _check_claimant(application: Application, user: AbstractBaseUser) -> None:
    if not reviews.is_reviewer(user):
        raise errors.NotAllowed(errors.NOT_REVIEWER, code="not_reviewer")
    if application.applicant_id == user.pk:
        raise errors.NotAllowed(errors.OWN_APPLICATION, code="own_application")


def claim_take(
    *, application: Application, reviewer: AbstractBaseUser, takeover: bool = False
) -> ClaimState:
    """Claim (or renew one's own claim); `takeover` also takes a live claim from another."""
    _check_claimant(application, reviewer)
    return _hand(application, by=reviewer, to=reviewer, takeover=takeover)


def claim_release(*, application: Application, reviewer: AbstractBaseUser) -> None:
    """Give one's own claim back. Releasing an application nobody holds is a no-op."""
    if not reviews.is_reviewer(reviewer):
        raise errors.NotAllowed(errors.NOT_REVIEWER, code="not_reviewer")
    released = Application.objects.filter(pk=application.pk, claimed_by=reviewer).update(
        claimed_by=None, claimed_at=None
    )
    if not released:
        current = Application.objects.select_related("claimed_by").filter(pk=application.pk)
        current = current.first()
        if current is None:
            raise errors.NotFound("No such application.")
        state = claim_of(current)
        if state.held:
            raise _refuse(application.pk, reviewer)
    application.claimed_by, application.claimed_at = None, None


def claim_reassign(
    *,
    application: Application,
    reviewer: AbstractBaseUser,
    to: AbstractBaseUser,
    takeover: bool = False,
) -> ClaimState:
    """Hand an application to another reviewer: the holder may, or anyone if nobody holds it."""
    _check_claimant(application, reviewer)
    if to.pk == application.applicant_id or not reviews.is_reviewer(to):
        raise errors.InvalidInput(REASSIGN_TARGET, code="not_reviewer_target")
    return _hand(application, by=reviewer, to=to, takeover=takeover)


def _hand(
    application: Application, *, by: AbstractBaseUser, to: AbstractBaseUser, takeover: bool
) -> ClaimState:
    """One conditional UPDATE: the claim passes to `to` if `by` may take it (nobody holds it,
    the claim expired, `by` holds it, or `takeover`) and the application awaits a decision."""
    now = timezone.now()
    rows = Application.objects.filter(pk=application.pk, status__in=reviews.DECIDABLE)
    if not takeover:
        rows = rows.filter(
            Q(claimed_by__isnull=True) | Q(claimed_at__lt=claim_cutoff(now)) | Q(claimed_by=by)
        )
    if not rows.update(claimed_by=to, claimed_at=now):
        raise _refuse(application.pk, by)
    application.claimed_by, application.claimed_at = to, now
    return ClaimState(to.pk, to.email, now)


def claim_guard(*, application: Application, reviewer: AbstractBaseUser) -> None:
    """Refuse a decision on an application another reviewer holds (a live claim)."""
    current = Application.objects.select_related("claimed_by").get(pk=application.pk)
    state = claim_of(current)
    if state.held and state.holder_id != reviewer.pk:
        raise errors.IllegalTransition(
            CLAIMED_BY_OTHER.format(holder=state.holder_email, since=state.since),
            code="claimed_by_other",
        )


def refuse_if_held(application: Application, reviewer: AbstractBaseUser) -> None:
    """claim_guard for an application already locked and loaded (select_for_update): no query."""
    held = (
        application.claimed_by_id is not None
        and application.claimed_by_id != reviewer.pk
        and application.claimed_at is not None
        and application.claimed_at >= claim_cutoff()
    )
    if held:
        holder = application.claimed_by
        raise errors.IllegalTransition(
            CLAIMED_BY_OTHER.format(holder=holder.email or holder, since=application.claimed_at),
            code="claimed_by_other",
        )


def end_claim(application: Application) -> list[str]:
    """Clear the claim on a deciding application; the fields to add to its save()."""
    application.claimed_by, application.claimed_at = None, None
    return ["claimed_by", "claimed_at"]


def claim_clear(application_ids: list[int]) -> int:
    """A decided application is held by nobody."""
    return Application.objects.filter(pk__in=application_ids, claimed_by__isnull=False).update(
        claimed_by=None, claimed_at=None
    )
