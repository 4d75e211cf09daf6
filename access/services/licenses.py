from __future__ import annotations

from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from access.errors import InvalidInput
from access.models import LicenseAcceptance, LicenseVersion


def license_current(*, at: datetime | None = None) -> LicenseVersion | None:
    moment = at or timezone.now()
    return (
        LicenseVersion.objects.filter(effective_from__lte=moment)
        .order_by("-effective_from", "-pk")
        .first()
    )


@transaction.atomic
def license_publish(
    *, name: str, version: str, text: str, effective_from: datetime | None = None
) -> LicenseVersion:
    if not text.strip():
        raise InvalidInput("A license needs its full text.")
    if LicenseVersion.objects.filter(version=version).exists():
        raise InvalidInput(f"License version {version} exists already; versions are immutable.")
    return LicenseVersion.objects.create(
        name=name,
        version=version,
        text=text,
        text_sha256=LicenseVersion.digest(text),
        effective_from=effective_from or timezone.now(),
    )


@transaction.atomic
def license_accept(
    *,
    user: AbstractBaseUser,
    license_version: LicenseVersion,
    ip_address: str | None,
    user_agent: str = "",
) -> LicenseAcceptance:
    """Record acceptance once per user and version; accepting again returns the first record."""
    acceptance, _ = LicenseAcceptance.objects.get_or_create(
        user=user,
        license_version=license_version,
        defaults={
            "ip_address": ip_address,
            "user_agent": user_agent[:300],
            "accepted_at": timezone.now(),
        },
    )
    return acceptance


def license_has_accepted_current(*, user: AbstractBaseUser) -> bool:
    current = license_current()
    return (
        current is not None
        and LicenseAcceptance.objects.filter(user=user, license_version=current).exists()
    )
