"""Reads used by pages, the admin and the API, always scoped to who asks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from allauth.account.models import EmailAddress
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q, QuerySet

from access.models import Application, Grant
from weights.models import Release

FREE_MAIL_DOMAINS = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "yahoo.com",
        "yahoo.co.uk",
        "hotmail.com",
        "outlook.com",
        "live.com",
        "msn.com",
        "aol.com",
        "icloud.com",
        "me.com",
        "mail.com",
        "gmx.com",
        "gmx.de",
        "proton.me",
        "protonmail.com",
        "yandex.com",
        "yandex.ru",
        "qq.com",
        "163.com",
        "126.com",
        "zoho.com",
        "web.de",
        "mail.ru",
        "hey.com",
        "tutanota.com",
    }
)


def applications_for(*, user: AbstractBaseUser) -> QuerySet[Application]:
    return Application.objects.filter(applicant=user).prefetch_related("requested_releases")


def application_open_for(*, user: AbstractBaseUser) -> Application | None:
    return applications_for(user=user).filter(status__in=Application.OPEN_STATUSES).first()


def grants_for(*, user: AbstractBaseUser) -> QuerySet[Grant]:
    return Grant.objects.filter(user=user).select_related("release", "license_version")


def review_queue() -> QuerySet[Application]:
    return (
        Application.objects.exclude(status=Application.Status.DRAFT)
        .select_related("applicant")
        .prefetch_related("requested_releases")
        .order_by("submitted_at", "pk")
    )


# The sort keys an integration may ask for; `id` breaks ties, so pages never overlap.
REVIEW_QUEUE_ORDERINGS = (
    "submitted_at",
    "-submitted_at",
    "updated_at",
    "-updated_at",
    "created_at",
    "-created_at",
)


def review_queue_filtered(
    *,
    statuses: Iterable[str],
    updated_since: datetime | None = None,
    release: Release | None = None,
    ordering: str = REVIEW_QUEUE_ORDERINGS[0],
) -> QuerySet[Application]:
    """The review queue as an integration polls it."""
    if ordering not in REVIEW_QUEUE_ORDERINGS:
        raise ValueError(f"unknown ordering {ordering!r}")
    queue = review_queue().filter(status__in=list(statuses))
    if updated_since is not None:
        queue = queue.filter(updated_at__gte=updated_since)
    if release is not None:
        queue = queue.filter(requested_releases=release)
    tie = "-pk" if ordering.startswith("-") else "pk"
    return queue.order_by(ordering, tie)


@dataclass(frozen=True)
class ScreeningFlag:
    code: str
    message: str


def _domain(email: str) -> str:
    return email.rsplit("@", 1)[-1].lower() if "@" in email else ""


def screening_flags(application: Application) -> list[ScreeningFlag]:
    """Automatic hints for reviewers. They inform a decision; they never make one."""
    flags: list[ScreeningFlag] = []
    if application.country and application.country.code in settings.PORTAL_RESTRICTED_COUNTRIES:
        flags.append(
            ScreeningFlag(
                "restricted_country",
                f"Country {application.country.name} is on the restricted list.",
            )
        )
    domain = _domain(application.institutional_email)
    if domain in FREE_MAIL_DOMAINS or domain in settings.PORTAL_EXTRA_FREE_MAIL_DOMAINS:
        flags.append(
            ScreeningFlag("free_mail", f"Institutional email uses a free-mail domain ({domain}).")
        )
    elif domain:
        verified_domains = {
            _domain(e)
            for e in EmailAddress.objects.filter(
                user=application.applicant_id, verified=True
            ).values_list("email", flat=True)
        }
        if domain not in verified_domains:
            flags.append(
                ScreeningFlag(
                    "unverified_domain",
                    f"No verified address at {domain}; the institutional email is unconfirmed.",
                )
            )
    others = Application.objects.exclude(applicant=application.applicant_id).exclude(
        status=Application.Status.DRAFT
    )
    duplicate_q = Q()
    if application.institutional_email:
        duplicate_q |= Q(institutional_email__iexact=application.institutional_email)
    if application.full_name:
        duplicate_q |= Q(full_name__iexact=application.full_name)
    if duplicate_q:
        for other in others.filter(duplicate_q).select_related("applicant")[:5]:
            same = (
                "email"
                if other.institutional_email.lower() == application.institutional_email.lower()
                else "name"
            )
            flags.append(
                ScreeningFlag(
                    "possible_duplicate",
                    f"Same {same} as application #{other.pk} by {other.applicant.email}.",
                )
            )
    if application.affiliation and application.full_name:
        near = others.filter(
            affiliation__iexact=application.affiliation, full_name__iexact=application.full_name
        )
        if near.exists() and not any(f.code == "possible_duplicate" for f in flags):
            flags.append(
                ScreeningFlag(
                    "possible_duplicate", "Same name and affiliation as another applicant."
                )
            )
    rejected = Application.objects.filter(
        applicant=application.applicant_id, status=Application.Status.REJECTED
    )
    if application.pk:
        rejected = rejected.exclude(pk=application.pk)
    count = rejected.count()
    if count:
        flags.append(
            ScreeningFlag(
                "earlier_rejection", f"{count} earlier application(s) by this person were rejected."
            )
        )
    return flags
