"""API tokens (django-rest-knox) and the second-factor rule for reviewers on every door.

Issue 9, items 1 and 2: a staff reviewer who never set up TOTP could mint a token and
approve through /api/review/...; tokens were stored in clear, never expired and survived
a password change.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from access.authentication import PASSWORD_CHANGED
from access.models import ApiToken, Application, ApplicationEvent
from access.second_factor import NEEDS_SECOND_FACTOR
from access.tokens import STAFF_NEEDS_SECOND_FACTOR, token_create
from tests.tokens import api_token
from tests.twofactor import activate_totp, password_login

S = Application.Status
TOKENS = "/account/api-tokens/"


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


def bearer(secret: str, scheme: str = "Bearer") -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{scheme} {secret}")
    return client


def review_calls(application: Application):
    base = f"/api/review/applications/{application.pk}/"
    return [
        ("get", "/api/review/applications/", None),
        ("get", base, None),
        ("post", base + "approve/", {"releases": ["llama-7b"]}),
        ("post", base + "request-info/", {"question": "Which lab?"}),
        ("post", base + "reject/", {"reason": "No."}),
        ("post", base + "revoke/", {"reason": "No."}),
        ("post", base + "claim/", {}),
        ("post", base + "release-claim/", None),
        ("get", "/api/review/grants/", None),
        (
            "post",
            "/api/review/grants/",
            {"user": application.applicant.email, "release": "llama-7b", "reason": "Collaborator."},
        ),
        ("post", "/api/review/grants/1/revoke/", {"reason": "No."}),
    ]


def secret_on(response) -> str:
    page = response.content.decode()
    start = page.index("<code data-token>") + len("<code data-token>")
    return page[start : page.index("</code>", start)]


# --- item 1: reviewers need a second factor on every door ------------------------------


def test_a_reviewer_signed_in_with_a_password_only_cannot_mint_a_token_or_review(
    client, reviewer, password, alice, make_submitted
):
    application = make_submitted(alice)
    assert password_login(client, reviewer, password).status_code == 302  # no TOTP set up

    page = client.get(TOKENS)
    assert STAFF_NEEDS_SECOND_FACTOR in page.content.decode()
    response = client.post(TOKENS, {"name": "laptop", "days": "7"})
    assert response.status_code == 400
    assert STAFF_NEEDS_SECOND_FACTOR in response.content.decode()
    assert not ApiToken.objects.exists()

    # The same session on the review API: refused, and nothing changes.
    for method, url, body in review_calls(application):
        response = getattr(client, method)(url, body, content_type="application/json")
        assert response.status_code == 403, url
        assert response.json()["detail"] == NEEDS_SECOND_FACTOR
    application.refresh_from_db()
    assert application.status == S.SUBMITTED
    assert not application.grants.exists()
    assert not ApplicationEvent.objects.filter(actor=reviewer).exists()


def test_a_token_minted_without_a_second_factor_never_acts_as_a_reviewer(
    reviewer, alice, make_submitted
):
    # Minted while the account was a researcher's, before it became staff.
    activate_totp(reviewer)
    reviewer.is_staff = False
    reviewer.save()
    secret = api_token(reviewer, second_factor=False)
    reviewer.is_staff = True
    reviewer.save()
    application = make_submitted(alice)
    api = bearer(secret)
    for method, url, body in review_calls(application):
        response = getattr(api, method)(url, body, format="json")
        assert response.status_code == 403, url
        assert response.json()["detail"] == NEEDS_SECOND_FACTOR
    assert Application.objects.get(pk=application.pk).status == S.SUBMITTED
    # ...while the researcher side of the API still works for the same token
    assert api.get("/api/applications/").status_code == 200


def test_a_reviewer_who_signed_in_with_totp_mints_a_token_that_reviews(
    reviewer_client, reviewer, alice, make_submitted
):
    application = make_submitted(alice)
    response = reviewer_client.post(TOKENS, {"name": "review scripts", "days": "7"})
    assert response.status_code == 200
    secret = secret_on(response)
    token = ApiToken.objects.get(user=reviewer)
    assert token.second_factor and token.name == "review scripts"

    response = bearer(secret).post(
        f"/api/review/applications/{application.pk}/approve/",
        {"releases": ["llama-7b"]},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert Application.objects.get(pk=application.pk).status == S.APPROVED


def test_a_reviewer_session_that_passed_totp_reviews_through_the_api(
    reviewer_client, alice, make_submitted
):
    application = make_submitted(alice)
    response = reviewer_client.get("/api/review/applications/")
    assert response.status_code == 200
    assert [row["id"] for row in response.json()["results"]] == [application.pk]


def test_turning_totp_off_ends_what_a_2fa_token_may_do(reviewer, alice, make_submitted):
    secret = api_token(reviewer)  # minted as after a TOTP sign-in
    reviewer.authenticator_set.all().delete()
    response = bearer(secret).get("/api/review/applications/")
    assert response.status_code == 403


def test_staff_tokens_live_at_most_the_staff_limit(reviewer_client, reviewer):
    response = reviewer_client.post(TOKENS, {"name": "long", "days": "90"})
    assert response.status_code == 400 and not ApiToken.objects.exists()
    response = reviewer_client.post(TOKENS, {"name": "week", "days": "7"})
    assert response.status_code == 200
    expiry = ApiToken.objects.get(user=reviewer).expiry
    assert timedelta(days=6, hours=23) < expiry - timezone.now() <= timedelta(days=7)


@override_settings(PORTAL_ADMIN_REQUIRE_2FA=False)
def test_the_embedded_development_mode_lets_staff_mint_without_totp(
    client, reviewer, password, alice, make_submitted
):
    application = make_submitted(alice)
    password_login(client, reviewer, password)
    response = client.post(TOKENS, {"name": "dev", "days": "1"})
    assert response.status_code == 200
    response = bearer(secret_on(response)).get(f"/api/review/applications/{application.pk}/")
    assert response.status_code == 200


# --- item 2: tokens stored as digests, expiring, named, revocable ---------------------------


def test_a_token_is_shown_once_and_stored_only_as_a_digest(alice_client, alice):
    response = alice_client.post(TOKENS, {"name": "cluster", "days": "30"})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    secret = secret_on(response)
    assert secret.startswith("lap_") and len(secret) == 4 + 64

    token = ApiToken.objects.get(user=alice)
    stored = [str(value) for value in ApiToken.objects.values_list().get()]
    assert not any(secret in value or secret[4:] in value for value in stored)
    assert len(token.digest) == 128 and secret.startswith(token.token_key)

    page = alice_client.get(TOKENS).content.decode()
    assert "cluster" in page and token.token_key in page and secret not in page
    assert bearer(secret).get("/api/applications/").status_code == 200


def test_bearer_and_token_schemes_both_work_and_bad_headers_are_401(alice):
    secret = api_token(alice)
    assert bearer(secret, "Bearer").get("/api/applications/").status_code == 200
    assert bearer(secret, "Token").get("/api/applications/").status_code == 200
    assert bearer(secret, "bearer").get("/api/applications/").status_code == 200
    for header in (
        "Bearer",
        "Bearer a b",
        f"Bearer {secret[:-1]}x",
        "Bearer lap_" + "zz" * 32,
        f"Basic {secret}x",
    ):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=header)
        response = client.get("/api/applications/")
        assert response.status_code == 401, header
    client = Client(HTTP_AUTHORIZATION=b"Bearer lap_\xff\xfe".decode("latin-1"))
    assert client.get("/api/applications/").status_code == 401


def test_an_expired_token_is_refused_and_hidden(alice_client, alice):
    secret = api_token(alice)
    ApiToken.objects.filter(user=alice).update(expiry=timezone.now() - timedelta(seconds=1))
    assert bearer(secret).get("/api/applications/").status_code == 401
    assert "You have no tokens." in alice_client.get(TOKENS).content.decode()


def test_several_named_tokens_revoke_one_or_all(alice_client, alice, bob):
    first = secret_on(alice_client.post(TOKENS, {"name": "laptop", "days": "7"}))
    second = secret_on(alice_client.post(TOKENS, {"name": "cluster", "days": "30"}))
    bobs = api_token(bob)
    assert {t.name for t in ApiToken.objects.filter(user=alice)} == {"laptop", "cluster"}

    laptop = ApiToken.objects.get(user=alice, name="laptop")
    # Bob cannot revoke Alice's token, even knowing its visible prefix.
    bob_client = Client()
    bob_client.force_login(bob)
    bob_client.post(reverse("access:api_token_revoke", args=[laptop.token_key]))
    assert bearer(first).get("/api/applications/").status_code == 200

    alice_client.post(reverse("access:api_token_revoke", args=[laptop.token_key]))
    assert bearer(first).get("/api/applications/").status_code == 401
    assert bearer(second).get("/api/applications/").status_code == 200

    alice_client.post(reverse("access:api_token_revoke_all"))
    assert bearer(second).get("/api/applications/").status_code == 401
    assert bearer(bobs).get("/api/applications/").status_code == 200


@override_settings(PORTAL_API_TOKENS_PER_USER=2)
def test_the_number_of_tokens_is_limited(alice_client, alice):
    for name in ("a", "b"):
        assert alice_client.post(TOKENS, {"name": name, "days": "7"}).status_code == 200
    response = alice_client.post(TOKENS, {"name": "c", "days": "7"})
    assert response.status_code == 400 and "revoke one first" in response.content.decode()
    assert ApiToken.objects.filter(user=alice).count() == 2


def test_a_password_change_through_allauth_ends_every_token(alice_client, alice, password):
    secrets = [api_token(alice, name="one"), api_token(alice, name="two")]
    response = alice_client.post(
        reverse("account_change_password"),
        {
            "oldpassword": password,
            "password1": "a new long passphrase 42",
            "password2": "a new long passphrase 42",
        },
    )
    assert response.status_code == 302
    for secret in secrets:
        response = bearer(secret).get("/api/applications/")
        assert response.status_code == 401
        assert response.json()["detail"] == PASSWORD_CHANGED
    assert not ApiToken.objects.filter(user=alice).exists()


@pytest.mark.parametrize("door", ["set_password", "changepassword"])
def test_a_password_change_on_any_other_door_ends_every_token(alice, door, monkeypatch):
    secret = api_token(alice)
    if door == "set_password":  # the admin's password form and scripts do this
        alice.set_password("another long passphrase 7")
        alice.save()
    else:
        monkeypatch.setattr("getpass.getpass", lambda prompt="": "another long passphrase 7")
        call_command("changepassword", alice.username)
    assert bearer(secret).get("/api/applications/").status_code == 401


def test_token_names_are_required_and_single_line(alice):
    from access import errors

    with pytest.raises(errors.InvalidInput):
        token_create(user=alice, name="   ", second_factor=False)
    with pytest.raises(errors.InvalidInput):
        token_create(user=alice, name="x", days=365, second_factor=False)
    with pytest.raises(errors.InvalidInput, match="U\\+202E"):
        token_create(user=alice, name="ci\u202etpircs", second_factor=False)
    assert not ApiToken.objects.exists()


def test_the_openapi_schema_says_how_to_get_and_send_a_token(client):
    import yaml

    schema = yaml.safe_load(client.get("/api/schema/").content)
    scheme = schema["components"]["securitySchemes"]["apiToken"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert "/account/api-tokens/" in scheme["description"]
    assert "POST /api/tokens/" in scheme["description"]
    assert "password changes" in scheme["description"]
    assert "tokenAuth" not in schema["components"]["securitySchemes"]


def test_the_review_rate_limit_is_one_budget_for_tokens_and_the_session(
    reviewer_client, reviewer, monkeypatch
):
    from rest_framework.throttling import ScopedRateThrottle

    monkeypatch.setitem(ScopedRateThrottle.THROTTLE_RATES, "review", "3/hour")
    api = bearer(api_token(reviewer))
    assert api.get("/api/review/applications/").status_code == 200
    assert api.get("/api/review/applications/").status_code == 200
    assert reviewer_client.get("/api/review/applications/").status_code == 200
    assert api.get("/api/review/applications/").status_code == 429
    assert reviewer_client.get("/api/review/applications/").status_code == 429


# --- the same rules over the API: POST /api/tokens/ from a session -------------------------


def test_a_reviewer_session_that_passed_totp_mints_a_reviewing_token_over_the_api(
    reviewer_client, reviewer, alice, make_submitted
):
    application = make_submitted(alice)
    too_long = reviewer_client.post(
        "/api/tokens/", {"name": "long", "days": 90}, content_type="application/json"
    )
    assert too_long.status_code == 400 and too_long.json()["errors"] == {
        "days": ["A token lives between 1 and 7 days."]
    }
    response = reviewer_client.post(
        "/api/tokens/", {"name": "review scripts"}, content_type="application/json"
    )
    assert response.status_code == 201, response.content
    assert response["Cache-Control"] == "no-store"
    created = response.json()
    token = ApiToken.objects.get(user=reviewer)
    assert (token.name, token.second_factor, created["second_factor"]) == (
        "review scripts",
        True,
        True,
    )
    assert created["key"] == token.token_key and created["token"].startswith(token.token_key)
    assert timedelta(days=6, hours=23) < token.expiry - timezone.now() <= timedelta(days=7)

    approved = bearer(created["token"]).post(
        f"/api/review/applications/{application.pk}/approve/",
        {"releases": ["llama-7b"]},
        format="json",
    )
    assert approved.status_code == 200, approved.content
    assert Application.objects.get(pk=application.pk).status == S.APPROVED


def test_tokens_are_listed_without_secrets_and_revoked_by_key(alice_client, alice, bob):
    created = alice_client.post(
        "/api/tokens/", {"name": "cluster", "days": 30}, content_type="application/json"
    ).json()
    api_token(bob)
    listing = bearer(created["token"]).get("/api/tokens/")
    assert listing.status_code == 200
    token = ApiToken.objects.get(user=alice)
    assert listing.json() == [
        {
            "key": token.token_key,
            "name": "cluster",
            "created": listing.json()[0]["created"],
            "expiry": listing.json()[0]["expiry"],
            "last_used_at": listing.json()[0]["last_used_at"],
            "second_factor": False,
        }
    ]
    assert listing.json()[0]["last_used_at"] is not None  # this very request used it
    assert created["token"] not in listing.content.decode()
    assert token.digest not in listing.content.decode()

    revoked = alice_client.delete(f"/api/tokens/{token.token_key}/")
    assert revoked.status_code == 204
    assert bearer(created["token"]).get("/api/tokens/").status_code == 401
    assert ApiToken.objects.filter(user=bob).count() == 1
