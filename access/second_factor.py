"""Who may act as a reviewer on this request: the second-factor rule for every door.

A reviewer acts only on a request that proved a second factor: a session that signed in
with an authenticator (TOTP) code (allauth mfa), or an API token minted from such a session
(`ApiToken.second_factor`). The admin, the review API and every later door ask
`second_factor_satisfied`; only the embedded development mode (PORTAL_ADMIN_REQUIRE_2FA
off, DEBUG only) relaxes it.
"""

from __future__ import annotations

from allauth.account.authentication import get_authentication_records
from allauth.mfa.models import Authenticator
from allauth.mfa.utils import is_mfa_enabled
from django.conf import settings
from django.http import HttpRequest

from access.models import ApiToken

NEEDS_SECOND_FACTOR = (
    "Reviewer actions need two-factor authentication: sign in with your authenticator code, "
    "then use that session or an API token created from it."
)


def session_passed_second_factor(request: HttpRequest) -> bool:
    """The signed-in session went through allauth's MFA stage."""
    if not hasattr(request, "session"):
        return False
    records = get_authentication_records(request, request.user)
    return any(record.get("method") == "mfa" for record in records)


def request_has_second_factor(request) -> bool:
    """This request (a Django or DRF request) is backed by a second factor."""
    auth = getattr(request, "auth", None)
    if isinstance(auth, ApiToken):
        return auth.second_factor
    return session_passed_second_factor(getattr(request, "_request", request))


def second_factor_satisfied(request) -> bool:
    if not settings.PORTAL_ADMIN_REQUIRE_2FA:
        return True
    user = request.user
    return is_mfa_enabled(user, [Authenticator.Type.TOTP]) and request_has_second_factor(request)
