"""Grants without an application, and revoking one grant at a time.

A reviewer gives a release to an existing account (a collaborator, a re-issue) with a
reason; the grantee gets an email, then a download link once the grant is committed, as
after an approval. A grant records the license in effect; the grantee must still accept
it before downloading (access.policies). Each direct grant and each grant revoked on its
own leaves a GrantEvent; decisions on a whole application stay ApplicationEvents.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import OuterRef, QuerySet, Subquery
from django.urls import reverse

from access import errors
from access.models import Grant, GrantEvent, LicenseAcceptance
from access.services import reviews
from access.services.licenses import license_current
from access.services.notifications import notification_create
from weights.models import Release

ALREADY_GRANTED = "{email} already holds an active grant for {release} (grant #{grant})."
OWN_GRANT = "You cannot grant a release to yourself."
ACCOUNT_INACTIVE = "The account {email} is disabled; only an active account can get a grant."
NO_LICENSE = "No license is in effect; a grant is given under the current license."
REASON_REQUIRED = "A reason is required; it is kept with the grant for the record."

Action = GrantEvent.Action


def _check_reviewer(reviewer: AbstractBaseUser, grantee: AbstractBaseUser) -> None:
    if not reviews.is_reviewer(reviewer):
        raise errors.NotAllowed(errors.NOT_REVIEWER, code="not_reviewer")
    if grantee.pk == reviewer.pk:
        raise errors.NotAllowed(OWN_GRANT, code="own_grant")


def _already_granted(
    user: AbstractBaseUser, release: Release, grant_id: int
) -> errors.ServiceError:
    return errors.IllegalTransition(
        ALREADY_GRANTED.format(email=user.email, release=release.name, grant=grant_id),
        code="already_granted",
    )


@transaction.atomic
def grant_direct(
    *, reviewer: AbstractBaseUser, user: AbstractBaseUser, release: Release, reason: str
) -> Grant:
    """Give `release` to `user` without an application; refused if a grant is active."""
    _check_reviewer(reviewer, user)
    reason = (reason or "").strip()
    if not reason:
        raise errors.InvalidInput(REASON_REQUIRED, code="reason_required")
    if not user.is_active:
        raise errors.InvalidInput(ACCOUNT_INACTIVE.format(email=user.email), code="inactive")
    license_version = license_current()
    if license_version is None:
        raise errors.IllegalTransition(NO_LICENSE, code="no_license")
    active = Grant.objects.filter(user=user, release=release, revoked_at__isnull=True).first()
    if active is not None:
        raise _already_granted(user, release, active.pk)
    try:
        with transaction.atomic():  # a concurrent grant loses on the one-active-grant rule
            grant = Grant.objects.create(
                user=user, release=release, license_version=license_version, granted_by=reviewer
            )
    except IntegrityError:
        winner = Grant.objects.get(user=user, release=release, revoked_at__isnull=True)
        raise _already_granted(user, release, winner.pk) from None
    GrantEvent.objects.create(grant=grant, actor=reviewer, action=Action.GRANTED, reason=reason)
    accepted = LicenseAcceptance.objects.filter(user=user, license_version=license_version)
    notification_create(
        kind="grant_direct",
        recipient=user.email,
        context={
            "full_name": user.get_full_name() or user.email,
            "release": release.name,
            "license_version": license_version.version,
            "license_accepted": accepted.exists(),
            "license_url": reverse("access:license_accept"),
            "status_url": reverse("weights:my_downloads"),
        },
    )
    # The same hook as an approval: weights issues and emails the link after commit.
    transaction.on_commit(lambda: reviews._grant_created(grant.pk))
    return grant


@transaction.atomic
def grant_revoke_one(*, grant: Grant, reviewer: AbstractBaseUser, reason: str) -> Grant:
    """Revoke one grant, leaving the application's other grants as they are."""
    direct = grant.application_id is None
    # reviews.grant_revoke emails through the application; a direct grant has none.
    revoked = reviews.grant_revoke(grant=grant, reviewer=reviewer, reason=reason, notify=not direct)
    GrantEvent.objects.create(
        grant=revoked, actor=reviewer, action=Action.REVOKED, reason=revoked.revoke_reason
    )
    if direct:
        notification_create(
            kind="grant_revoked",
            recipient=revoked.user.email,
            context={
                "full_name": revoked.user.get_full_name() or revoked.user.email,
                "release": revoked.release.name,
                "reason": revoked.revoke_reason,
                "status_url": reverse("weights:my_downloads"),
            },
        )
    return revoked


def grants_for_review(
    *,
    user: AbstractBaseUser | None = None,
    release: Release | None = None,
    active: bool | None = None,
) -> QuerySet[Grant]:
    """Grants newest first, each with `direct_reason` (blank for an application's grant)."""
    direct_reason = GrantEvent.objects.filter(grant=OuterRef("pk"), action=Action.GRANTED)
    grants = Grant.objects.select_related(
        "user", "release", "license_version", "granted_by", "revoked_by"
    ).annotate(direct_reason=Subquery(direct_reason.values("reason")[:1]))
    if user is not None:
        grants = grants.filter(user=user)
    if release is not None:
        grants = grants.filter(release=release)
    if active is not None:
        grants = grants.filter(revoked_at__isnull=active)
    return grants.order_by("-created_at", "-pk")
