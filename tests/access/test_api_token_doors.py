"""The API-token page's routes as doors: sign-in, scoping, CSRF, methods, bad input, rate limit.

The second-factor rule for staff on this page is in test_api_tokens.py.
"""

from __future__ import annotations

import pytest
from django.test import Client, override_settings
from django.urls import reverse

from access.models import ApiToken
from access.tokens import CREATE_RATE_LIMITED, NAME_REQUIRED, NO_SUCH_TOKEN
from tests.tokens import api_token

TOKENS = reverse("access:api_tokens")


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


def revoke_url(token: ApiToken) -> str:
    return reverse("access:api_token_revoke", args=[token.token_key])


def test_anonymous_callers_are_sent_to_sign_in_and_revoke_nothing(client, alice):
    api_token(alice)
    token = ApiToken.objects.get()
    for url in (revoke_url(token), reverse("access:api_token_revoke_all")):
        response = client.post(url)
        assert response.status_code == 302
        assert response.url == f"{reverse('account_login')}?next={url}"
    assert ApiToken.objects.count() == 1


def test_the_old_address_leads_to_the_tokens_page(alice_client):
    response = alice_client.get("/account/api-token/")
    assert response.status_code in (301, 302) and response.url == TOKENS


def test_revoking_needs_a_post_with_a_csrf_token(alice):
    api_token(alice)
    token = ApiToken.objects.get()
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    for url in (revoke_url(token), reverse("access:api_token_revoke_all")):
        assert client.get(url).status_code == 405
        assert client.post(url).status_code == 403
    assert ApiToken.objects.count() == 1


def test_an_unknown_or_foreign_token_key_is_refused_without_a_trace(alice_client, bob):
    api_token(bob)
    bobs = ApiToken.objects.get()
    for key in (bobs.token_key, "lap_nothing", "lap_\u202e\x01", "x" * 300):
        response = alice_client.post(reverse("access:api_token_revoke", args=[key]), follow=True)
        assert response.status_code == 200
        assert NO_SUCH_TOKEN in response.content.decode()
    assert ApiToken.objects.filter(pk=bobs.pk).exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "", "days": "7"}, "This field is required."),
        ({"name": "   ", "days": "7"}, "This field is required."),
        ({"name": "x" * 101, "days": "7"}, "at most 100 characters"),
        ({"name": "ci\u202escript", "days": "7"}, "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ({"name": "nul\x00", "days": "7"}, "Null characters are not allowed."),
        ({"name": "ok", "days": "abc"}, "Select a valid choice."),
        ({"name": "ok", "days": "0"}, "Select a valid choice."),
        ({"name": "ok", "days": "365"}, "Select a valid choice."),
        ({"name": "ok"}, "This field is required."),
        ({"name": ["a", "b"], "days": ["7", "30"]}, None),  # repeated fields: last one wins
    ],
)
def test_bad_input_is_a_400_with_a_precise_message_and_writes_nothing(alice_client, data, message):
    response = alice_client.post(TOKENS, data)
    if message is None:
        assert response.status_code == 200 and ApiToken.objects.count() == 1
        return
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not ApiToken.objects.exists()


def test_the_service_refuses_a_blank_name_for_every_door(alice):
    from access import errors
    from access.tokens import token_create

    with pytest.raises(errors.InvalidInput, match=NAME_REQUIRED):
        token_create(user=alice, name="\t \n", second_factor=False)


@override_settings(PORTAL_API_TOKEN_CREATE_RATE="3/h", PORTAL_API_TOKENS_PER_USER=50)
def test_creating_tokens_is_rate_limited_even_when_each_is_revoked(alice_client, alice):
    for _ in range(3):
        assert alice_client.post(TOKENS, {"name": "loop", "days": "1"}).status_code == 200
        alice_client.post(reverse("access:api_token_revoke_all"))
    response = alice_client.post(TOKENS, {"name": "fourth", "days": "1"})
    assert response.status_code == 429
    assert CREATE_RATE_LIMITED in response.content.decode()
    assert not ApiToken.objects.filter(user=alice).exists()


@override_settings(PORTAL_API_TOKEN_CREATE_RATE="2/h")
def test_refused_creations_do_not_use_the_allowance(alice_client, alice):
    for _ in range(3):
        assert alice_client.post(TOKENS, {"name": "", "days": "7"}).status_code == 400
    for name in ("one", "two"):
        assert alice_client.post(TOKENS, {"name": name, "days": "7"}).status_code == 200
    assert alice_client.post(TOKENS, {"name": "three", "days": "7"}).status_code == 429
    assert ApiToken.objects.filter(user=alice).count() == 2
