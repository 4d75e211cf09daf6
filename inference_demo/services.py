"""Rules of the hosted demo: who may use it, within which limits, and what is recorded."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q, Sum
from django.utils import timezone

from access.policies import AccessDecision, can_use_release
from inference_demo import runtime
from inference_demo.models import DemoRequest
from weights.models import Release

Status = DemoRequest.Status

NO_DEMO = "There is no demo for {release}."
PROMPT_EMPTY = "Write a prompt first."
PROMPT_TOO_LONG = "Keep the prompt under {limit} characters (it has {n})."
TOO_MANY = "You already have {n} requests running; wait for one to finish or stop it."
QUOTA = "You have used your daily demo allowance ({quota} tokens); {left} tokens left today, and this request may use {asked}."
NOT_YOURS = "No such demo request."


class DemoRefused(Exception):
    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int = 400,
        action_url: str = "",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.status, self.action_url = code, status, action_url
        self.retry_after = retry_after  # seconds, for a 429


MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 64

# A running request usually ends within seconds; a client should look again soon.
CONCURRENCY_RETRY_SECONDS = 5


@dataclass(frozen=True)
class DemoParams:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    stop: tuple[str, ...] = ()  # generation ends before any of these (the OpenAI door)

    def validate(self) -> DemoParams:
        caps = settings.DEMO_LIMITS
        problems = []
        if not 1 <= self.max_new_tokens <= caps["max_new_tokens"]:
            problems.append(f"max_new_tokens must be between 1 and {caps['max_new_tokens']}")
        if not 0 <= self.temperature <= caps["max_temperature"]:
            problems.append(f"temperature must be between 0 and {caps['max_temperature']}")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be greater than 0 and at most 1")
        if len(self.stop) > MAX_STOPS or not all(0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            problems.append(
                f"stop takes at most {MAX_STOPS} sequences of 1 to {MAX_STOP_CHARS} characters"
            )
        if problems:
            raise DemoRefused("; ".join(problems) + ".", code="invalid_params")
        return self

    def as_dict(self) -> dict:
        values = asdict(self)
        if not self.stop:  # the page sends none; its records stay as they were
            del values["stop"]
        else:
            values["stop"] = list(self.stop)
        return values


def demo_releases() -> list[Release]:
    """Releases with a demo (built-in engine or OpenAI-compatible server), in catalogue order."""
    return list(Release.objects.filter(slug__in=runtime.demo_slugs()))


def demo_access(user: AbstractBaseUser, release: Release) -> AccessDecision:
    """The same check as downloads, plus: this release must have a demo."""
    if release.slug not in runtime.demo_slugs():
        return AccessDecision(False, "no_demo", NO_DEMO.format(release=release))
    return can_use_release(user, release)


def tokens_used_today(user: AbstractBaseUser) -> int:
    """Finished requests count what they produced; open ones what they may still produce."""
    since = timezone.now() - timedelta(days=1)
    rows = DemoRequest.objects.filter(user=user, created_at__gte=since)
    done = (
        rows.exclude(status__in=DemoRequest.OPEN_STATUSES).aggregate(n=Sum("tokens_out"))["n"] or 0
    )
    reserved = sum(r.max_new_tokens for r in rows.filter(status__in=DemoRequest.OPEN_STATUSES))
    return done + reserved


def quota_retry_after(user: AbstractBaseUser, *, asked: int) -> int:
    """Seconds until enough of the last 24 hours' tokens leave the window for `asked` more."""
    now = timezone.now()
    limit = settings.DEMO_LIMITS["daily_tokens"]
    rows = DemoRequest.objects.filter(user=user, created_at__gte=now - timedelta(days=1))
    used = tokens_used_today(user)
    for row in rows.order_by("created_at"):
        used -= row.max_new_tokens if row.status in DemoRequest.OPEN_STATUSES else row.tokens_out
        if used + asked <= limit:
            return max(1, math.ceil((row.created_at + timedelta(days=1) - now).total_seconds()))
    return 24 * 3600  # asks for more than a whole day allows


@transaction.atomic
def demo_request_create(
    *,
    user: AbstractBaseUser,
    release: Release,
    prompt: str,
    params: DemoParams,
    client: str = "web",
) -> DemoRequest:
    decision = demo_access(user, release)
    if not decision.allowed:
        raise DemoRefused(
            decision.message, code=decision.reason, status=403, action_url=decision.action_url
        )
    prompt = (prompt or "").strip()
    limits = settings.DEMO_LIMITS
    if not prompt:
        raise DemoRefused(PROMPT_EMPTY, code="prompt_empty")
    if len(prompt) > limits["max_prompt_chars"]:
        raise DemoRefused(
            PROMPT_TOO_LONG.format(limit=limits["max_prompt_chars"], n=len(prompt)),
            code="prompt_too_long",
        )
    params.validate()
    # Serialise this user's requests so that two tabs cannot both slip under the limits.
    get_user_model().objects.select_for_update().filter(pk=user.pk).first()
    stale = timezone.now() - timedelta(seconds=limits["stale_after_s"])
    running = DemoRequest.objects.filter(
        user=user, status__in=DemoRequest.OPEN_STATUSES, created_at__gte=stale
    )
    if running.count() >= limits["concurrent_per_user"]:
        raise DemoRefused(
            TOO_MANY.format(n=running.count()),
            code="too_many",
            status=429,
            retry_after=CONCURRENCY_RETRY_SECONDS,
        )
    used = tokens_used_today(user)
    if used + params.max_new_tokens > limits["daily_tokens"]:
        left = max(0, limits["daily_tokens"] - used)
        raise DemoRefused(
            QUOTA.format(quota=limits["daily_tokens"], left=left, asked=params.max_new_tokens),
            code="quota",
            status=429,
            retry_after=quota_retry_after(user, asked=params.max_new_tokens),
        )
    return DemoRequest.objects.create(
        user=user, release=release, prompt=prompt, params=params.as_dict(), client=client
    )


def demo_request_for(*, user: AbstractBaseUser, request_id: int) -> DemoRequest:
    request = DemoRequest.objects.filter(pk=request_id, user=user).select_related("release").first()
    if request is None:
        raise DemoRefused(NOT_YOURS, code="not_found", status=404)
    return request


def demo_request_started(*, request_id: int) -> bool:
    return bool(
        DemoRequest.objects.filter(pk=request_id, status=Status.QUEUED).update(
            status=Status.RUNNING, started_at=timezone.now()
        )
    )


def demo_request_cancel(*, request_id: int) -> bool:
    """Record a Stop on an open request; the process that runs it reads the row.

    Any web process may receive the Stop, and only the one generating (a web process in
    embedded mode, a demo worker in services mode) can act on it, so the database, which
    all of them share, carries it. True when this call recorded it.
    """
    return bool(
        DemoRequest.objects.filter(
            pk=request_id, status__in=DemoRequest.OPEN_STATUSES, cancel_requested_at__isnull=True
        ).update(cancel_requested_at=timezone.now())
    )


def demo_cancel_requested(*, request_id: int) -> bool:
    """Whether a Stop was recorded for this request (one primary-key lookup)."""
    return DemoRequest.objects.filter(pk=request_id, cancel_requested_at__isnull=False).exists()


def demo_request_finished(
    *,
    request_id: int,
    status: str,
    finish_reason: str = "",
    tokens_in: int = 0,
    tokens_out: int = 0,
    ttft_ms: int | None = None,
    duration_ms: int | None = None,
    error: str = "",
) -> bool:
    """Record the outcome once; a second report for the same request changes nothing."""
    return bool(
        DemoRequest.objects.filter(pk=request_id, status__in=DemoRequest.OPEN_STATUSES).update(
            status=status,
            finish_reason=finish_reason,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            ttft_ms=ttft_ms,
            duration_ms=duration_ms,
            error=error[:2000],
            finished_at=timezone.now(),
        )
    )


def demo_requests_purge(*, now=None) -> int:
    cutoff = (now or timezone.now()) - timedelta(days=settings.DEMO_RETENTION_DAYS)
    deleted, _ = DemoRequest.objects.filter(Q(created_at__lt=cutoff)).delete()
    return deleted
