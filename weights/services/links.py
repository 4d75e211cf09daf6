"""Download links: issue, revoke, resolve on every request, and charge bytes to budgets."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.mail import EmailMultiAlternatives
from django.db import transaction
from django.db.models import Exists, OuterRef, Subquery
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import SimpleLazyObject

from access.models import Grant, LicenseAcceptance, LicenseVersion
from access.policies import LICENSE_NOT_ACCEPTED, grant_holder_decision
from portal.text import one_line
from weights import tokens
from weights.models import DownloadLink
from weights.services import fingerprinting
from weights.services.budget import usages_create


def _now() -> datetime:
    return timezone.now()


class LinkRefused(Exception):
    """Why a link cannot be used now; each kind has its own status and page."""

    status = 403
    code = "refused"

    def __init__(
        self, message: str, *, link: DownloadLink | None = None, action_url: str = ""
    ) -> None:
        super().__init__(message)
        self.link = link
        self.action_url = action_url


class LinkInvalid(LinkRefused):
    status = 404
    code = "invalid"


class LinkExpired(LinkRefused):
    status = 410
    code = "expired"


class LinkRevoked(LinkRefused):
    status = 403
    code = "revoked"


class LicenseRequired(LinkRefused):
    status = 403
    code = "license"


class BudgetSpent(LinkRefused):
    status = 429
    code = "budget"


INVALID = "This download link is not valid. Check that you copied the whole link from the email."
EXPIRED = "This download link expired on {when}. Sign in and request a fresh link on My downloads."
REVOKED = "This download link was revoked. Sign in to My downloads to see your access."
GRANT_REVOKED = "Your access to {release} was revoked; this link no longer works."
EXPIRED_REASON = "Expired."  # the revoke_reason the expiry sweep writes
REPLACED_REASON = "Replaced by a fresh link."


@dataclass(frozen=True)
class IssuedLink:
    link: DownloadLink
    token: str

    @property
    def path(self) -> str:
        return reverse("weights:landing", args=[self.token])


def link_issue(
    *, grant: Grant, lifetime: timedelta | None = None, budget_copies: int | None = None
) -> IssuedLink:
    """Create a fresh link for an active grant, revoking the grant's previous live link."""
    with transaction.atomic():
        grant = Grant.objects.select_for_update().select_related("release").get(pk=grant.pk)
        if grant.revoked_at is not None:
            raise LinkRevoked(GRANT_REVOKED.format(release=grant.release))
        now = _now()
        DownloadLink.objects.filter(grant=grant, revoked_at__isnull=True).update(
            revoked_at=now, revoke_reason=REPLACED_REASON
        )
        token = tokens.new_token()
        link = DownloadLink.objects.create(
            grant=grant,
            token_hash=tokens.token_hash(token),
            token_hint=token[:6],
            created_at=now,
            expires_at=now + (lifetime or timedelta(hours=settings.WEIGHTS_LINK_LIFETIME_HOURS)),
            budget_copies=budget_copies or settings.WEIGHTS_LINK_BUDGET_COPIES,
        )
        usages_create(link=link, artifacts=grant.release.artifacts.all())
    return IssuedLink(link=link, token=token)


def link_issue_and_email(*, grant_id: int) -> bool:
    """Issue the grant's first link and email it. Idempotent: a grant that already had a link
    emailed gets nothing. The token lives only in the email, never in the database."""
    with transaction.atomic():
        grant = Grant.objects.select_for_update().select_related("release", "user").get(pk=grant_id)
        if (
            grant.revoked_at is not None
            or grant.download_links.filter(emailed_at__isnull=False).exists()
            # A fingerprinted release's link goes out once the grantee's copy is ready
            # (weights.tasks.issue_download_link prepares it first).
            or not fingerprinting.copies_ready(grant)
        ):
            return False
        issued = link_issue(grant=grant)
        link_email(grant, issued).send()
        DownloadLink.objects.filter(pk=issued.link.pk).update(emailed_at=_now())
    return True


def link_email(grant: Grant, issued: IssuedLink) -> EmailMultiAlternatives:
    context = {
        # A direct grant has no application to take the name from.
        "full_name": (grant.application.full_name if grant.application else "") or grant.user.email,
        "release": grant.release.name,
        "url": settings.SITE_URL + issued.path,
        "expires_at": issued.link.expires_at,
        "budget_copies": issued.link.budget_copies,
        "downloads_url": settings.SITE_URL + reverse("weights:my_downloads"),
        "site_url": settings.SITE_URL,
    }
    message = EmailMultiAlternatives(
        subject=one_line(
            settings.ACCOUNT_EMAIL_SUBJECT_PREFIX
            + render_to_string("email/download_link_subject.txt", context)
        ),
        body=render_to_string("email/download_link.txt", context),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[grant.user.email],
    )
    message.attach_alternative(render_to_string("email/download_link.html", context), "text/html")
    return message


def grants_without_link_ids() -> list[int]:
    """Active grants whose link email never went out (broker down, worker died)."""
    return list(
        Grant.objects.filter(revoked_at__isnull=True)
        .exclude(download_links__emailed_at__isnull=False)
        .values_list("pk", flat=True)
    )


@transaction.atomic
def link_revoke(*, link: DownloadLink, actor: AbstractBaseUser | None, reason: str) -> DownloadLink:
    link = DownloadLink.objects.select_for_update().get(pk=link.pk)
    if link.revoked_at is None:
        link.revoked_at = _now()
        link.revoked_by = actor
        link.revoke_reason = reason[:300]
        link.save(update_fields=["revoked_at", "revoked_by", "revoke_reason"])
    return link


def links_revoke_for_grant(*, grant_id: int, reason: str = "Access revoked.") -> int:
    return DownloadLink.objects.filter(grant_id=grant_id, revoked_at__isnull=True).update(
        revoked_at=_now(), revoke_reason=reason
    )


def link_resolve(token: str) -> DownloadLink:
    """Re-check everything a request must satisfy; raise the precise refusal otherwise."""
    if not tokens.looks_like_token(token):
        raise LinkInvalid(INVALID)
    try:
        link = links_with_access_facts().get(token_hash=tokens.token_hash(token))
    except DownloadLink.DoesNotExist:
        raise LinkInvalid(INVALID) from None
    link_check(link, in_flight=False)
    return link


def link_recheck(*, link_id: int) -> LinkRefused | None:
    """Why a transfer already under way on this link must stop now, or None to go on.

    The rules of link_resolve, read afresh from the database, except expiry: a transfer
    authorised before the link expired may finish, as a presigned URL's would."""
    try:
        link = links_with_access_facts().get(pk=link_id)
    except DownloadLink.DoesNotExist:
        return LinkInvalid(INVALID)
    try:
        link_check(link, in_flight=True)
    except LinkRefused as error:
        return error
    return None


def links_with_access_facts():
    """Links with their grant, release and user, and the license facts the access check
    needs (current version, accepted by the grant's user): one query per request."""
    current = LicenseVersion.objects.filter(effective_from__lte=_now()).order_by(
        "-effective_from", "-pk"
    )
    return DownloadLink.objects.select_related("grant__release", "grant__user").annotate(
        license_version=Subquery(current.values("version")[:1]),
        license_accepted=Exists(
            LicenseAcceptance.objects.filter(
                user=OuterRef("grant__user"), license_version=Subquery(current.values("pk")[:1])
            )
        ),
    )


def link_check(link: DownloadLink, *, in_flight: bool) -> None:
    """The rules every link request must satisfy; `link` carries the license facts
    (license_version, license_accepted) read with it."""
    grant = link.grant
    if grant.revoked_at is not None:
        raise LinkRevoked(GRANT_REVOKED.format(release=grant.release), link=link)
    expired = link.is_expired(_now())
    # A link closed by the expiry sweep still reads as expired, not as revoked by a person.
    expired_and_closed = link.revoke_reason == EXPIRED_REASON and expired
    if link.revoked_at is not None and not expired_and_closed:
        raise LinkRevoked(REVOKED, link=link, action_url=reverse("weights:my_downloads"))
    if expired and not in_flight:
        when = timezone.localtime(link.expires_at).strftime("%d %b %Y %H:%M %Z")
        raise LinkExpired(
            EXPIRED.format(when=when), link=link, action_url=reverse("weights:my_downloads")
        )
    decision = grant_holder_decision(
        grant.user,
        SimpleLazyObject(lambda: grant.release),  # read only to name it in a refusal
        license_version=link.license_version,
        accepted=link.license_accepted,
    )
    if not decision.allowed:
        kind = LicenseRequired if decision.reason == LICENSE_NOT_ACCEPTED else LinkRevoked
        raise kind(decision.message, link=link, action_url=decision.action_url)
