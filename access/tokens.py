"""Personal API tokens: create, list, revoke. Rules here; the page and the API call these.

A token's secret is returned once by `token_create` and never stored (knox keeps a SHA-512
digest). Staff may mint a token only from a session that passed their second factor, and
such a token is marked `second_factor`; the review API accepts no other (access.second_factor).
Both doors that mint (the page and POST /api/tokens/) are signed-in sessions, never a token,
and go through `token_create_from_session`: one allowance per user and hour for both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone
from django_ratelimit.core import get_usage

from access import errors
from access.models import ApiToken
from access.second_factor import session_passed_second_factor
from access.validators import NoInvisibleCharacters

NAME_REQUIRED = "Give the token a name, e.g. the machine or script that will use it."
NAME_TOO_LONG = "A token name has at most 100 characters."
TOO_MANY = "You have {count} tokens, the most allowed; revoke one first."
BAD_LIFETIME = "A token lives between 1 and {days} days."
STAFF_NEEDS_SECOND_FACTOR = (
    "Staff tokens act as a reviewer, so they can only be created after signing in with "
    "your authenticator code. Set up two-factor authentication, sign out and sign in again."
)
NO_SUCH_TOKEN = "No such token."
CREATE_RATE_LIMITED = "You created many tokens in the last hour; try again later."
TOKEN_NAME = NoInvisibleCharacters("Token name")


class TokenInputInvalid(errors.InvalidInput):
    """Bad input for one field of the request (`field`), so the API can name it."""

    def __init__(self, message: str, *, code: str, field: str) -> None:
        super().__init__(message, code=code)
        self.field = field


class TokenCreateLimited(errors.ServiceError):
    code = "throttled"
    http_status = 429

    def __init__(self, *, retry_after: int) -> None:
        super().__init__(CREATE_RATE_LIMITED)
        self.retry_after = retry_after


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    secret: str  # shown once, never stored


def password_stamp(user: AbstractBaseUser) -> str:
    """Changes whenever the password does (Django's session-auth hash, keyed by SECRET_KEY)."""
    return hashlib.sha256(user.get_session_auth_hash().encode()).hexdigest()


def max_lifetime_days(user: AbstractBaseUser) -> int:
    if user.is_staff:
        return min(settings.PORTAL_STAFF_TOKEN_MAX_DAYS, settings.PORTAL_API_TOKEN_MAX_DAYS)
    return settings.PORTAL_API_TOKEN_MAX_DAYS


def tokens_of(user: AbstractBaseUser):
    """The user's tokens that still work (expired ones are hidden, and purged by knox)."""
    now = timezone.now()
    return ApiToken.objects.filter(user=user, expiry__gt=now).order_by("-created")


@transaction.atomic
def token_create(
    *,
    user: AbstractBaseUser,
    name: str,
    days: int | None = None,
    second_factor: bool,
) -> IssuedToken:
    """Mint a token. `second_factor`: the request that asks proved a second factor."""
    name = " ".join(name.split())
    if not name:
        raise TokenInputInvalid(NAME_REQUIRED, code="name_required", field="name")
    if len(name) > 100:
        raise TokenInputInvalid(NAME_TOO_LONG, code="name_too_long", field="name")
    try:
        TOKEN_NAME(name)
    except ValidationError as exc:
        raise TokenInputInvalid(exc.messages[0], code="invisible_character", field="name") from None
    if user.is_staff and settings.PORTAL_ADMIN_REQUIRE_2FA and not second_factor:
        raise errors.NotAllowed(STAFF_NEEDS_SECOND_FACTOR, code="second_factor_required")
    limit_days = max_lifetime_days(user)
    days = min(settings.PORTAL_API_TOKEN_DAYS, limit_days) if days is None else days
    if not 1 <= days <= limit_days:
        raise TokenInputInvalid(
            BAD_LIFETIME.format(days=limit_days), code="bad_lifetime", field="days"
        )
    get_user_model().objects.select_for_update().filter(pk=user.pk).first()  # one at a time
    count = tokens_of(user).count()
    if count >= settings.PORTAL_API_TOKENS_PER_USER:
        raise errors.IllegalTransition(TOO_MANY.format(count=count), code="too_many_tokens")
    token, secret = ApiToken.objects.create(
        user=user,
        expiry=timedelta(days=days),
        name=name,
        second_factor=second_factor,
        password_stamp=password_stamp(user),
    )
    return IssuedToken(token=token, secret=secret)


def _create_usage(request: HttpRequest, *, record: bool) -> dict | None:
    return get_usage(
        request,
        group="access.token_create",
        key="user",
        rate=settings.PORTAL_API_TOKEN_CREATE_RATE,
        increment=record,
    )


def token_create_allowance_check(request: HttpRequest) -> None:
    """Refuse (429) once the user behind `request` has created PORTAL_API_TOKEN_CREATE_RATE
    tokens in the window; counted in the shared cache, for every door."""
    usage = _create_usage(request, record=False)
    if usage is not None and usage["count"] >= usage["limit"]:
        raise TokenCreateLimited(retry_after=max(1, usage["time_left"]))


def token_create_from_session(
    *, request: HttpRequest, name: str, days: int | None = None
) -> IssuedToken:
    """Mint a token for the signed-in session behind `request` (the page, POST /api/tokens/):
    within the allowance, which only a token actually created uses up."""
    token_create_allowance_check(request)
    issued = token_create(
        user=request.user,
        name=name,
        days=days,
        second_factor=session_passed_second_factor(request),
    )
    _create_usage(request, record=True)
    return issued


def token_revoke(*, user: AbstractBaseUser, token_key: str) -> None:
    deleted, _ = ApiToken.objects.filter(user=user, token_key=token_key).delete()
    if not deleted:
        raise errors.NotFound(NO_SUCH_TOKEN, code="not_found")


def token_revoke_all(*, user: AbstractBaseUser) -> int:
    deleted, _ = ApiToken.objects.filter(user=user).delete()
    return deleted
