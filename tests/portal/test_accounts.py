"""Accounts through allauth's pages: sign-up, verification, login, logout, reset, throttling."""

from __future__ import annotations

import re

import pytest
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "a much longer passphrase 42"
URL = re.compile(r"https?://testserver(/\S+)")


def emailed_path(message, fragment: str) -> str:
    """The path of the first link in an email that contains `fragment`."""
    paths = [path for path in URL.findall(message.body) if fragment in path]
    assert paths, f"no link with {fragment!r} in:\n{message.body}"
    return paths[0]


def login(client: Client, email: str, password: str):
    return client.post("/accounts/login/", {"login": email, "password": password})


def logged_in_user(client: Client):
    return client.get("/").wsgi_request.user


def sign_up(client: Client, email: str = "dana@uni.example.edu"):
    return client.post(
        "/accounts/signup/", {"email": email, "password1": NEW_PASSWORD, "password2": NEW_PASSWORD}
    )


def test_signup_sends_a_verification_email_and_login_waits_for_it(client):
    response = sign_up(client)
    assert response.status_code == 302
    assert response.url == "/accounts/confirm-email/"
    user = get_user_model().objects.get(email="dana@uni.example.edu")
    assert not EmailAddress.objects.get(user=user).verified
    (message,) = mail.outbox
    assert message.to == ["dana@uni.example.edu"]
    assert message.subject.startswith("[LLaMA access] ")
    emailed_path(message, "/accounts/confirm-email/")
    assert not logged_in_user(client).is_authenticated

    other = Client()
    response = login(other, "dana@uni.example.edu", NEW_PASSWORD)
    assert response.status_code == 302 and response.url == "/accounts/confirm-email/"
    assert not logged_in_user(other).is_authenticated


def test_following_the_confirmation_link_verifies_and_logs_in(client):
    sign_up(client)
    path = emailed_path(mail.outbox[0], "/accounts/confirm-email/")
    page = client.get(path)
    assert page.status_code == 200 and b'method="post"' in page.content
    assert not EmailAddress.objects.get(email="dana@uni.example.edu").verified  # GET only asks

    response = client.post(path)
    assert response.status_code == 302
    assert EmailAddress.objects.get(email="dana@uni.example.edu").verified
    assert logged_in_user(client).email == "dana@uni.example.edu"

    fresh = Client()
    response = login(fresh, "dana@uni.example.edu", NEW_PASSWORD)
    assert response.status_code == 302 and response.url == "/"
    assert logged_in_user(fresh).is_authenticated


def test_the_link_opened_in_another_browser_verifies_without_logging_that_browser_in(client):
    # allauth logs in on confirmation only in the session that signed up, so a leaked
    # link never hands out a session.
    sign_up(client)
    path = emailed_path(mail.outbox[0], "/accounts/confirm-email/")
    other = Client()
    assert other.post(path).status_code == 302
    assert EmailAddress.objects.get(email="dana@uni.example.edu").verified
    assert not logged_in_user(other).is_authenticated


def test_a_forged_confirmation_key_verifies_nothing(client):
    sign_up(client)
    response = Client().post("/accounts/confirm-email/not-a-real-key/")
    assert response.status_code in (200, 404)
    assert not EmailAddress.objects.get(email="dana@uni.example.edu").verified


def test_login_and_logout(client, alice, password):
    response = login(client, alice.email, "wrong password")
    assert response.status_code == 200
    assert b"The email address and/or password you specified are not correct." in response.content
    assert not logged_in_user(client).is_authenticated

    response = login(client, alice.email, password)
    assert response.status_code == 302 and response.url == "/"
    assert logged_in_user(client) == alice

    response = client.get("/accounts/logout/")  # GET only asks; it does not sign out
    assert logged_in_user(client) == alice
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    assert not logged_in_user(client).is_authenticated


def test_password_reset_sends_a_working_link_and_the_new_password_works(client, alice, password):
    response = client.post("/accounts/password/reset/", {"email": alice.email})
    assert response.status_code == 302
    (message,) = mail.outbox
    assert message.to == [alice.email]
    path = emailed_path(message, "/accounts/password/reset/key/")

    page = client.get(path, follow=True)
    assert page.status_code == 200
    form_path = page.redirect_chain[-1][0] if page.redirect_chain else path
    assert b"password1" in page.content
    response = client.post(form_path, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert response.status_code == 302

    assert login(Client(), alice.email, password).status_code == 200  # old one refused
    fresh = Client()
    assert login(fresh, alice.email, NEW_PASSWORD).status_code == 302
    assert logged_in_user(fresh) == alice

    # The link is single-use.
    again = Client().get(path, follow=True)
    assert b"password1" not in again.content
    assert b"invalid" in again.content.lower()


def test_password_reset_for_an_unknown_address_reveals_nothing_and_resets_nothing(client, alice):
    response = client.post("/accounts/password/reset/", {"email": "nobody@uni.example.edu"})
    assert response.status_code == 302
    assert all("/accounts/password/reset/key/" not in m.body for m in mail.outbox)


def test_repeated_failed_logins_are_throttled_even_with_the_right_password(
    client, alice, bob, password
):
    for _ in range(5):
        response = login(client, alice.email, "wrong password")
        assert response.status_code == 200
        assert b"not correct" in response.content
    response = login(client, alice.email, password)
    assert response.status_code == 200  # allauth refuses with a form error, not a 429
    assert b"Too many failed login attempts" in response.content
    assert not logged_in_user(client).is_authenticated

    # The per-address limit locks alice's address, not everyone's.
    other = Client()
    assert login(other, bob.email, password).status_code == 302
    assert logged_in_user(other) == bob


def test_failed_logins_from_one_ip_are_throttled_across_addresses(client, alice, bob, password):
    for i in range(10):
        login(client, f"nobody{i}@uni.example.edu", "wrong password")
    response = login(client, bob.email, password)
    assert b"Too many failed login attempts" in response.content
    assert not logged_in_user(client).is_authenticated


def test_login_form_enforces_csrf(alice, password):
    client = Client(enforce_csrf_checks=True)
    response = login(client, alice.email, password)
    assert response.status_code == 403
    assert not logged_in_user(client).is_authenticated

    page = client.get("/accounts/login/")
    token = page.cookies["csrftoken"].value
    response = client.post(
        "/accounts/login/",
        {"login": alice.email, "password": password, "csrfmiddlewaretoken": token},
    )
    assert response.status_code == 302
    assert logged_in_user(client) == alice


def test_signup_enforces_csrf():
    client = Client(enforce_csrf_checks=True)
    assert sign_up(client).status_code == 403
    assert not get_user_model().objects.filter(email="dana@uni.example.edu").exists()
    assert not mail.outbox
