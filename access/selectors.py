"""Reads used by pages, the admin and the API, always scoped to who asks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from allauth.account.models import EmailAddress
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q, QuerySet
from django.db.models.functions import Lower

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
        .select_related("applicant", "claimed_by")
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
    return screening_flags_for([application])[application.pk]


def _cased(value: str) -> tuple[str, str]:
    return value, value.lower()


def _is_free_mail(domain: str) -> bool:
    return domain in FREE_MAIL_DOMAINS or domain in settings.PORTAL_EXTRA_FREE_MAIL_DOMAINS


def screening_flags_for(applications: Iterable[Application]) -> dict[int, list[ScreeningFlag]]:
    """The flags of many applications in three queries, whatever their number and the table's size.

    The duplicate look-up goes through the lower-cased email and name indexes
    (application_email_lower_idx, application_name_lower_idx).
    """
    applications = list(applications)
    if not applications:
        return {}
    applicant_ids = {a.applicant_id for a in applications}
    verified_domains: dict[int, set[str]] = {}
    if any(_domain(a.institutional_email) for a in applications):
        for user_id, email in EmailAddress.objects.filter(
            user__in=applicant_ids, verified=True
        ).values_list("user_id", "email"):
            verified_domains.setdefault(user_id, set()).add(_domain(email))

    # The raw values too: SQLite's LOWER() folds ASCII only, Python's lower() all of Unicode.
    emails = {
        v for a in applications if a.institutional_email for v in _cased(a.institutional_email)
    }
    names = {v for a in applications if a.full_name for v in _cased(a.full_name)}
    by_email: dict[str, list[dict]] = {}
    by_name: dict[str, list[dict]] = {}
    if emails or names:
        candidates = (
            Application.objects.exclude(status=Application.Status.DRAFT)
            .annotate(email_lower=Lower("institutional_email"), name_lower=Lower("full_name"))
            .filter(Q(email_lower__in=emails) | Q(name_lower__in=names))
            .order_by()
            .values("pk", "applicant_id", "institutional_email", "full_name", "applicant__email")
        )
        for row in candidates:
            by_email.setdefault(row["institutional_email"].lower(), []).append(row)
            by_name.setdefault(row["full_name"].lower(), []).append(row)

    rejected: dict[int, set[int]] = {}
    for applicant_id, pk in Application.objects.filter(
        applicant__in=applicant_ids, status=Application.Status.REJECTED
    ).values_list("applicant_id", "pk"):
        rejected.setdefault(applicant_id, set()).add(pk)

    return {a.pk: _flags_of(a, verified_domains, by_email, by_name, rejected) for a in applications}


def _flags_of(
    application: Application,
    verified_domains: dict[int, set[str]],
    by_email: dict[str, list[dict]],
    by_name: dict[str, list[dict]],
    rejected: dict[int, set[int]],
) -> list[ScreeningFlag]:
    flags: list[ScreeningFlag] = []
    if application.country and application.country.code in settings.PORTAL_RESTRICTED_COUNTRIES:
        flags.append(
            ScreeningFlag(
                "restricted_country",
                f"Country {application.country.name} is on the restricted list.",
            )
        )
    domain = _domain(application.institutional_email)
    if _is_free_mail(domain):
        flags.append(
            ScreeningFlag("free_mail", f"Institutional email uses a free-mail domain ({domain}).")
        )
    elif domain and domain not in verified_domains.get(application.applicant_id, set()):
        flags.append(
            ScreeningFlag(
                "unverified_domain",
                f"No verified address at {domain}; the institutional email is unconfirmed.",
            )
        )
    email = application.institutional_email.lower()
    name = application.full_name.lower()
    seen: set[int] = set()
    others = []
    # Earlier matches first, as a reviewer reads the queue; at most five.
    for row in sorted(
        [*(by_email.get(email, []) if email else []), *(by_name.get(name, []) if name else [])],
        key=lambda row: row["pk"],
    ):
        if row["applicant_id"] == application.applicant_id or row["pk"] in seen:
            continue
        seen.add(row["pk"])
        others.append(row)
    for other in others[:5]:
        same = "email" if email and other["institutional_email"].lower() == email else "name"
        flags.append(
            ScreeningFlag(
                "possible_duplicate",
                f"Same {same} as application #{other['pk']} by {other['applicant__email']}.",
            )
        )
    count = len(rejected.get(application.applicant_id, set()) - {application.pk})
    if count:
        flags.append(
            ScreeningFlag(
                "earlier_rejection", f"{count} earlier application(s) by this person were rejected."
            )
        )
    return flags
