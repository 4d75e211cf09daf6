"""Hostile and mistaken API requests: deep JSON, unknown paths, wrong methods, missing slashes.

Everything under /api/ answers in the API's error envelope {"detail", "code", "errors"}
with a 4xx, in DEBUG and not: never a 500, never an HTML page, never a redirect that drops
the body.
"""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

from access.models import Application, LicenseAcceptance
from portal.api_errors import DID_YOU_MEAN, NO_ENDPOINT
from portal.api_parsers import MAX_DEPTH, TOO_DEEP
from tests.conftest import FIELDS
from tests.factories import ReleaseFactory

pytestmark = pytest.mark.django_db

DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 kB: under the body limit, far over the stack
JSON = "application/json"


def envelope(detail: str, code: str) -> dict:
    return {"detail": detail, "code": code, "errors": {}}


TOO_DEEP_ERROR = envelope(TOO_DEEP, "parse_error")


def nested(depth: int) -> bytes:
    return b'{"full_name": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.fixture
def demo(releases):
    return ReleaseFactory(slug="llama-demo", name="LLaMA demo", sort_order=10)


def session_client(user) -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


def forced_client(user) -> APIClient:
    client = APIClient(raise_request_exception=False)
    client.force_authenticate(user)
    return client


DEEP_DOORS = [  # (endpoint, how the caller authenticates)
    ("/api/applications/", session_client),
    ("/api/applications/", forced_client),
    ("/api/license/accept/", forced_client),
    ("/api/demo/llama-demo/generate/", session_client),
]


@pytest.mark.parametrize(("path", "signed_in"), DEEP_DOORS)
def test_deep_json_is_a_400_that_says_why(alice, license_v1, demo, path, signed_in):
    response = signed_in(alice).post(path, DEEP, content_type=JSON)
    assert response.status_code == 400, response.content[:300]
    assert response.json() == TOO_DEEP_ERROR
    # Nesting the stack could take but no request needs is refused the same way.
    response = signed_in(alice).post(path, nested(MAX_DEPTH + 1), content_type=JSON)
    assert (response.status_code, response.json()) == (400, TOO_DEEP_ERROR)
    assert Application.objects.count() == 0 and LicenseAcceptance.objects.count() == 0
    # At the limit the body parses, and the endpoint itself judges it.
    within = signed_in(alice).post(path, nested(MAX_DEPTH), content_type=JSON)
    assert within.status_code < 500 and within.json() != TOO_DEEP_ERROR
    # Anonymous callers are told to sign in, whatever the body.
    anonymous = Client(raise_request_exception=False).post(path, DEEP, content_type=JSON)
    assert anonymous.status_code == 401 and anonymous["Content-Type"] == JSON


@pytest.fixture(params=[True, False], ids=["debug", "production"])
def debug(request, settings):
    settings.DEBUG = request.param
    return request.param


def error(response) -> dict:
    assert response["Content-Type"] == JSON, response.content[:300]
    return response.json()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", ["/api/nope/", "/api/applications/abc/", "/api/", "/api"])
def test_unknown_api_paths_are_a_json_404(alice, debug, method, path):
    response = session_client(alice).generic(method, path, b"{}", content_type=JSON)
    assert response.status_code == 404
    assert error(response) == envelope(NO_ENDPOINT.format(path=path), "not_found")
    anonymous = Client().generic(method, path, b"{}", content_type=JSON)
    assert anonymous.status_code == 404 and error(anonymous)["code"] == "not_found"


@pytest.mark.parametrize(
    ("sent", "meant"),
    [
        ("/api/applications", "/api/applications/"),
        ("/api/license/accept", "/api/license/accept/"),
        ("/api/demo/llama-demo/generate", "/api/demo/llama-demo/generate/"),
    ],
)
def test_a_wrong_trailing_slash_is_a_json_404_naming_the_url(
    alice, releases, demo, debug, sent, meant
):
    body = {**FIELDS, "releases": ["llama-7b"]}
    response = forced_client(alice).post(sent, body, format="json")
    assert response.status_code == 404
    assert not response.has_header("Location")
    assert error(response) == envelope(DID_YOU_MEAN.format(path=sent, url=meant), "not_found")
    assert Application.objects.count() == 0


def test_get_without_the_slash_is_answered_the_same_way(alice, debug):
    response = forced_client(alice).get("/api/releases")
    assert response.status_code == 404 and not response.has_header("Location")
    assert error(response)["detail"] == DID_YOU_MEAN.format(
        path="/api/releases", url="/api/releases/"
    )


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/api/schema/", "GET, HEAD, OPTIONS"),
        ("POST", "/api/docs/", "GET, HEAD, OPTIONS"),
        ("BREW", "/api/docs/", "GET, HEAD, OPTIONS"),
    ],
)
def test_wrong_methods_are_a_json_405_with_allow(alice, debug, method, path, allow):
    response = forced_client(alice).generic(method, path)
    assert response.status_code == 405
    assert response["Allow"] == allow
    assert error(response) == envelope(f'Method "{method}" not allowed.', "method_not_allowed")


def test_a_form_post_without_the_slash_is_a_404_not_a_500_in_debug(settings):
    settings.DEBUG = True
    response = Client(raise_request_exception=False).post(
        "/accounts/login", {"login": "a@example.org", "password": "x"}
    )
    assert response.status_code == 404
