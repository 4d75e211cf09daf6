"""Signing in as staff do: password, then the authenticator (TOTP) code."""

from __future__ import annotations

import time

from allauth.mfa import app_settings as mfa_settings
from allauth.mfa.totp.internal.auth import (
    TOTP,
    format_hotp_value,
    generate_totp_secret,
    hotp_value,
    yield_hotp_counters_from_time,
)
from django.test import Client
from django.urls import reverse


def current_totp_code(secret: str) -> str:
    # allauth accepts only the current 30 s step; do not type a code that is about to expire.
    if mfa_settings.TOTP_PERIOD - time.time() % mfa_settings.TOTP_PERIOD < 2:
        time.sleep(2)
    (counter,) = yield_hotp_counters_from_time()
    return format_hotp_value(hotp_value(secret, counter))


def activate_totp(user) -> str:
    secret = generate_totp_secret()
    TOTP.activate(user, secret)
    return secret


def password_login(client: Client, user, password: str):
    return client.post(reverse("account_login"), {"login": user.email, "password": password})


def login_with_2fa(client: Client, user, password: str) -> Client:
    """Sign in through allauth: password, then the authenticator code."""
    secret = activate_totp(user)
    response = password_login(client, user, password)
    assert response.status_code == 302
    assert response["Location"] == reverse("mfa_authenticate")
    response = client.post(reverse("mfa_authenticate"), {"code": current_totp_code(secret)})
    assert response.status_code == 302, response.content[:2000]
    assert client.session["_auth_user_id"] == str(user.pk)
    return client
