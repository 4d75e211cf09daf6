"""API tokens for tests, minted through the service as the token page does."""

from __future__ import annotations

from allauth.mfa.utils import is_mfa_enabled

from access.tokens import token_create
from tests.twofactor import activate_totp


def api_token(user, *, second_factor: bool | None = None, name: str = "tests") -> str:
    """A token secret for `user`. Staff get one minted as after a TOTP sign-in (the only
    kind the review API accepts) unless `second_factor=False` says otherwise."""
    if second_factor is None:
        second_factor = user.is_staff
    if second_factor and not is_mfa_enabled(user):
        activate_totp(user)
    return token_create(user=user, name=name, second_factor=second_factor).secret
