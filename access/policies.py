"""Who may use a release: the one access check that downloads and the demo both call."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.urls import reverse

from access.models import Application, Grant, LicenseAcceptance
from access.services.licenses import license_current


@dataclass(frozen=True)
class AccessDecision:
    allowed: bool
    reason: str  # machine-readable code
    message: str  # what the person reads
    action_url: str = ""  # where to go to fix it

    def __bool__(self) -> bool:
        return self.allowed


ALLOWED = "allowed"
SIGN_IN = "sign_in"
INACTIVE = "inactive"
PENDING = "pending"
NO_GRANT = "no_grant"
REVOKED = "revoked"
NO_LICENSE = "no_license"
LICENSE_NOT_ACCEPTED = "license_not_accepted"


def can_use_release(user: AbstractBaseUser | AnonymousUser, release) -> AccessDecision:
    """Decide whether `user` may download or demo `release`, and say why not."""
    if not user.is_authenticated:
        return AccessDecision(
            False, SIGN_IN, "Sign in to use this release.", reverse("account_login")
        )
    if not user.is_active:
        return AccessDecision(False, INACTIVE, "This account is disabled.")
    grant = Grant.objects.filter(user=user, release=release, revoked_at__isnull=True).first()
    if grant is None:
        return _refusal_without_grant(user, release)
    current = license_current()
    accepted = (
        current is not None
        and LicenseAcceptance.objects.filter(user=user, license_version=current).exists()
    )
    return grant_holder_decision(
        user, release, license_version=current.version if current else None, accepted=accepted
    )


def grant_holder_decision(
    user: AbstractBaseUser, release, *, license_version: str | None, accepted: bool
) -> AccessDecision:
    """The rest of the check for someone who holds an active grant, from facts already
    read: the current license's version (None: no license in effect) and whether `user`
    accepted it. The download door reads those facts in the same query as the link."""
    if not user.is_active:
        return AccessDecision(False, INACTIVE, "This account is disabled.")
    if license_version is None:
        return AccessDecision(False, NO_LICENSE, "No license is in effect; access is paused.")
    if not accepted:
        return AccessDecision(
            False,
            LICENSE_NOT_ACCEPTED,
            f"The license changed to version {license_version}. Accept it to continue using {release}.",
            reverse("access:license_accept"),
        )
    return AccessDecision(True, ALLOWED, "Access granted.")


def _refusal_without_grant(user: AbstractBaseUser, release) -> AccessDecision:
    if Grant.objects.filter(user=user, release=release).exists():
        return AccessDecision(
            False,
            REVOKED,
            f"Your access to {release} was revoked.",
            reverse("access:application_list"),
        )
    pending = Application.objects.filter(
        applicant=user,
        status__in=(Application.Status.SUBMITTED, Application.Status.INFO_REQUESTED),
        requested_releases=release,
    ).first()
    if pending is not None:
        return AccessDecision(
            False,
            PENDING,
            f"Your application for {release} is being reviewed.",
            reverse("access:application_detail", args=[pending.pk]),
        )
    return AccessDecision(
        False,
        NO_GRANT,
        f"You have no access to {release}. Apply for it first.",
        reverse("access:apply"),
    )
