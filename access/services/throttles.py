"""The submission allowance: how many applications one researcher may submit per window.

One rule for every door (the apply page and the API). What it counts is the user's
successful submissions, the "submitted" events in the database, so:

* every web process sees the same count, in embedded and in services mode, and
* a refused submission (bad input, wrong state, license not accepted) costs nothing: the
  only thing counted is the event a successful submit writes in its own transaction.

Check, then submit, in one transaction: the check locks the user's row, so two concurrent
submissions by one user are counted one after the other (SQLite serialises every write
transaction anyway), and the allowance holds exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from access import errors
from access.models import ApplicationEvent

SUBMIT_RATE_LIMITED = "Too many submissions from your account; try again in an hour."
BAD_RATE = "PORTAL_SUBMIT_RATE must look like 10/h or 3/30m (count/[n]unit, unit s, m, h or d)"
NOT_IN_TRANSACTION = "submission_allowance_check must run inside the submission's transaction"

# django-ratelimit's format, which the setting has always used: "10/h", "3/30m", "10/hour".
_RATE = re.compile(r"(?P<count>\d+)/(?P<multiplier>\d*)(?P<unit>[smhd])[a-z]*")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Rate:
    count: int
    window: timedelta


class SubmitRateLimited(errors.ServiceError):
    code = "throttled"
    http_status = 429

    def __init__(self, *, retry_after: int) -> None:
        super().__init__(SUBMIT_RATE_LIMITED)
        self.retry_after = retry_after


def _now() -> datetime:
    return timezone.now()


def rate_parse(value: str) -> Rate:
    match = _RATE.fullmatch(value.strip())
    if match is None or int(match["count"]) < 1 or match["multiplier"] == "0":
        raise ImproperlyConfigured(f"{BAD_RATE}; got {value!r}")
    seconds = int(match["multiplier"] or 1) * _UNIT_SECONDS[match["unit"]]
    return Rate(count=int(match["count"]), window=timedelta(seconds=seconds))


def submission_allowance_check(*, user: AbstractBaseUser) -> None:
    """Refuse a submission beyond PORTAL_SUBMIT_RATE (a sliding window) with a 429 error."""
    if not transaction.get_connection().in_atomic_block:
        raise TransactionManagementError(NOT_IN_TRANSACTION)
    rate = rate_parse(settings.PORTAL_SUBMIT_RATE)
    get_user_model().objects.select_for_update().only("pk").get(pk=user.pk)
    now = _now()
    recent = list(
        ApplicationEvent.objects.filter(
            actor=user,
            action=ApplicationEvent.Action.SUBMITTED,
            created_at__gt=now - rate.window,
        )
        .order_by("created_at")
        .values_list("created_at", flat=True)
    )
    if len(recent) >= rate.count:
        # Room again once enough of the recent submissions have left the window.
        frees_up = recent[len(recent) - rate.count] + rate.window - now
        raise SubmitRateLimited(retry_after=max(1, math.ceil(frees_up.total_seconds())))
