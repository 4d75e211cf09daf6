"""One error envelope for every status under /api/, and every operation documented.

Each refusal is `{"detail": str, "code": str, "errors": {field: [str]}}` with exactly those
keys; `errors` is `{}` unless input fields are wrong. Plain Django views that answer their
own JSON under /api/ (the Hugging Face Hub protocol) are left as they answer.
"""

from __future__ import annotations

import re

import pytest
from django.test import Client, override_settings
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from access import errors
from access.models import ApiToken, Application
from access.second_factor import NEEDS_SECOND_FACTOR
from access.token_api import NOT_FROM_A_TOKEN, SIGN_IN_FIRST
from access.tokens import (
    BAD_LIFETIME,
    CREATE_RATE_LIMITED,
    NAME_REQUIRED,
    NO_SUCH_TOKEN,
    STAFF_NEEDS_SECOND_FACTOR,
)
from portal.api_errors import NO_ENDPOINT
from tests.tokens import api_token

pytestmark = pytest.mark.django_db
ENVELOPE = {"detail", "code", "errors"}
JSON = "application/json"
BAD_DATETIME = (
    "Datetime has wrong format. Use one of these formats instead: "
    "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]."
)
ORDERINGS = "submitted_at, -submitted_at, updated_at, -updated_at, created_at, -created_at"


def refusal(detail: str, code: str) -> dict:
    return {"detail": detail, "code": code, "errors": {}}


def invalid(errors: dict[str, list[str]]) -> dict:
    problems = " ".join(f"{field}: {' '.join(messages)}" for field, messages in errors.items())
    return {"detail": f"Invalid input. {problems}", "code": "invalid", "errors": errors}


def bearer(user) -> APIClient:
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token(user)}")
    return client


def session(user) -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


def assert_envelope(response, status: int, expected: dict) -> None:
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"] == JSON
    body = response.json()
    assert set(body) == ENVELOPE
    assert body == expected


# --- 400 -------------------------------------------------------------------------------


def test_400_names_each_wrong_field(alice, releases):
    response = bearer(alice).post(
        "/api/applications/", {"full_name": ["A"], "nope": 1}, format="json"
    )
    assert_envelope(
        response,
        400,
        invalid(
            {
                "full_name": ["Not a valid string."],
                "nope": ["Unknown field. See /api/docs/ for the fields this endpoint accepts."],
            }
        ),
    )
    assert not Application.objects.exists()


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ({"updated_since": "yesterday"}, "updated_since", BAD_DATETIME),
        ({"updated_since": "2025-13-01T00:00:00Z"}, "updated_since", BAD_DATETIME),
        (
            {"ordering": "applicant_email"},
            "ordering",
            f'"applicant_email" is not a valid ordering; use one of: {ORDERINGS}.',
        ),
        (
            {"release": "gpt-5"},
            "release",
            "Unknown release(s): gpt-5. Choose from: llama-7b, llama-13b, llama-33b, llama-65b.",
        ),
        ({"status": "draft"}, "status", '"draft" is not a valid choice.'),
    ],
)
def test_400_for_a_bad_queue_filter_names_the_parameter(reviewer, releases, query, field, message):
    response = bearer(reviewer).get("/api/review/applications/", query)
    assert_envelope(response, 400, invalid({field: [message]}))


def test_400_for_token_input_names_the_field(alice):
    client = session(alice)
    for body, field, message, code in [
        ({"name": "   "}, "name", NAME_REQUIRED, "name_required"),
        ({"name": "ok", "days": 365}, "days", BAD_LIFETIME.format(days=90), "bad_lifetime"),
    ]:
        response = client.post("/api/tokens/", body, content_type=JSON)
        assert_envelope(
            response, 400, {"detail": message, "code": code, "errors": {field: [message]}}
        )
    assert not ApiToken.objects.exists()


def test_400_for_a_body_that_is_not_json(alice):
    response = bearer(alice).post("/api/applications/", b"{", content_type=JSON)
    assert response.status_code == 400
    assert response.json()["code"] == "parse_error" and response.json()["errors"] == {}
    assert response.json()["detail"].startswith("JSON parse error - Expecting property name")


# --- 401, 403 --------------------------------------------------------------------------


def test_401_without_credentials_or_with_a_bad_token():
    assert_envelope(
        APIClient().get("/api/grants/"),
        401,
        refusal("Authentication credentials were not provided.", "not_authenticated"),
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer lap_" + "0" * 64)
    response = client.get("/api/grants/")
    assert_envelope(response, 401, refusal("Invalid token.", "authentication_failed"))
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    anonymous = APIClient().post("/api/tokens/", {"name": "x"}, format="json")
    assert_envelope(anonymous, 401, refusal(SIGN_IN_FIRST, "not_authenticated"))


def test_403_says_which_rule_refused(alice, reviewer, password):
    assert_envelope(
        bearer(alice).get("/api/review/applications/"),
        403,
        refusal(errors.NOT_REVIEWER, "not_reviewer"),
    )
    assert_envelope(
        bearer(alice).post("/api/tokens/", {"name": "more"}, format="json"),
        403,
        refusal(NOT_FROM_A_TOKEN, "session_required"),
    )
    no_totp = session(reviewer)
    assert_envelope(
        no_totp.get("/api/review/applications/"),
        403,
        refusal(NEEDS_SECOND_FACTOR, "second_factor_required"),
    )
    assert_envelope(
        no_totp.post("/api/tokens/", {"name": "staff"}, content_type=JSON),
        403,
        refusal(STAFF_NEEDS_SECOND_FACTOR, "second_factor_required"),
    )
    csrf = Client(enforce_csrf_checks=True)
    csrf.force_login(alice)
    response = csrf.post("/api/tokens/", {"name": "x"}, content_type=JSON)
    assert response.status_code == 403 and response.json()["code"] == "permission_denied"
    assert response.json()["detail"] == "CSRF Failed: CSRF cookie not set."
    assert not ApiToken.objects.filter(user=alice, name__in=["more", "x"]).exists()


# --- 404, 405, 406 ---------------------------------------------------------------------


def test_404_for_unknown_paths_and_objects(alice, bob):
    assert_envelope(
        Client().get("/api/nope/"), 404, refusal(NO_ENDPOINT.format(path="/api/nope/"), "not_found")
    )
    assert_envelope(
        bearer(alice).get("/api/applications/99/"),
        404,
        refusal("No such application.", "not_found"),
    )
    api_token(bob)
    bobs = ApiToken.objects.get(user=bob)
    response = bearer(alice).delete(f"/api/tokens/{bobs.token_key}/")
    assert_envelope(response, 404, refusal(NO_SUCH_TOKEN, "not_found"))
    assert ApiToken.objects.filter(pk=bobs.pk).exists()
    assert_envelope(
        bearer(alice).get("/api/applications/", {"page": 9}),
        404,
        refusal("Invalid page.", "not_found"),
    )


def test_405_and_406_are_envelopes_too(alice):
    response = bearer(alice).put("/api/applications/", {}, format="json")
    assert_envelope(response, 405, refusal('Method "PUT" not allowed.', "method_not_allowed"))
    assert response["Allow"] == "GET, POST, HEAD, OPTIONS"
    html_only = bearer(alice).get("/api/applications/", HTTP_ACCEPT="text/html")
    assert_envelope(
        html_only, 406, refusal("Could not satisfy the request Accept header.", "not_acceptable")
    )


# --- 409, 413, 415, 429 ----------------------------------------------------------------


def test_409_for_an_illegal_transition(alice, make_submitted):
    application = make_submitted(alice)
    Application.objects.filter(pk=application.pk).update(status=Application.Status.APPROVED)
    response = bearer(alice).post(f"/api/applications/{application.pk}/withdraw/")
    assert_envelope(
        response,
        409,
        refusal(
            errors.TRANSITION.format(action="withdraw", status="approved"), "illegal_transition"
        ),
    )


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=4096)
def test_413_for_a_body_over_the_limit(alice):
    too_large = refusal(
        "Request body too large: the API accepts at most 4096 bytes.", "body_too_large"
    )
    body = b'{"role": "' + b"x" * 5000 + b'"}'
    for client in (bearer(alice), session(alice)):
        assert_envelope(client.post("/api/applications/", body, content_type=JSON), 413, too_large)
    assert not Application.objects.exists()


def test_415_for_a_body_that_is_not_json(alice):
    response = bearer(alice).post(
        "/api/applications/", b"role=x", content_type="application/x-www-form-urlencoded"
    )
    assert_envelope(
        response,
        415,
        refusal(
            'Unsupported media type "application/x-www-form-urlencoded" in request.',
            "unsupported_media_type",
        ),
    )


@override_settings(PORTAL_API_TOKEN_CREATE_RATE="2/h", PORTAL_API_TOKENS_PER_USER=50)
def test_429_for_tokens_shares_the_allowance_with_the_page(alice):
    client = session(alice)
    assert client.post("/account/api-tokens/", {"name": "page", "days": "7"}).status_code == 200
    assert client.post("/api/tokens/", {"name": "api"}, content_type=JSON).status_code == 201
    response = client.post("/api/tokens/", {"name": "third"}, content_type=JSON)
    assert_envelope(response, 429, refusal(CREATE_RATE_LIMITED, "throttled"))
    assert 0 < int(response["Retry-After"]) <= 3600
    assert client.post("/account/api-tokens/", {"name": "p2", "days": "7"}).status_code == 429
    assert sorted(ApiToken.objects.values_list("name", flat=True)) == ["api", "page"]


def test_429_for_the_review_api_carries_retry_after(reviewer, monkeypatch):
    from rest_framework.throttling import ScopedRateThrottle

    monkeypatch.setitem(ScopedRateThrottle.THROTTLE_RATES, "review", "1/hour")
    api = bearer(reviewer)
    assert api.get("/api/review/applications/").status_code == 200
    response = api.get("/api/review/applications/")
    assert response.status_code == 429
    wait = int(response["Retry-After"])
    assert 3590 <= wait <= 3600
    assert response.json() == refusal(
        f"Request was throttled. Expected available in {wait} seconds.", "throttled"
    )


# --- views that are not DRF's keep their own answers -----------------------------------


def test_the_hub_protocol_under_api_keeps_its_own_answers(alice):
    # weights.hub: plain Django views whose headers and `error` the huggingface_hub client
    # reads; nothing of the DRF envelope machinery rewrites them.
    missing = bearer(alice).get("/api/models/research/nope")
    assert missing.status_code == 404
    assert missing["X-Error-Code"] == "RepoNotFound"
    assert "error" in missing.json()
    whoami = APIClient().get("/api/whoami-v2")
    assert whoami.status_code == 401 and whoami["X-Error-Message"]
    assert "error" in whoami.json()
    # ...while the rest of /api/ answers in the envelope, exactly.
    assert set(bearer(alice).get("/api/nope/").json()) == ENVELOPE


# --- every operation of the schema is documented ----------------------------------------


SCHEMA = SchemaGenerator().get_schema(request=None, public=True)
OPERATIONS = [
    (path_, method, spec)
    for path_, item in SCHEMA["paths"].items()
    for method, spec in item.items()
    if method in ("get", "post", "put", "patch", "delete")
]
ENVELOPE_REF = "#/components/schemas/ErrorEnvelope"


@pytest.mark.parametrize(
    ("path_", "method", "spec"), OPERATIONS, ids=[spec["operationId"] for *_, spec in OPERATIONS]
)
def test_every_operation_is_documented_with_its_errors(path_, method, spec):
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", spec["operationId"])
    assert spec.get("summary") and len(spec.get("description", "")) > 40
    assert spec.get("tags")
    errors_documented = {int(code) for code in spec["responses"] if int(code) >= 400}
    assert 401 in errors_documented
    if "{" in path_:
        assert 404 in errors_documented
    if "requestBody" in spec:
        assert {400, 413, 415} <= errors_documented
    if any(
        p["in"] == "query" and p["name"] not in ("page", "page_size")
        for p in spec.get("parameters", [])
    ):
        assert 400 in errors_documented
    for code in errors_documented:
        response = spec["responses"][str(code)]
        assert response["description"]
        assert response["content"]["application/json"]["schema"]["$ref"] == ENVELOPE_REF
    if 429 in errors_documented:
        headers = spec["responses"]["429"].get("headers", {})
        assert "Retry-After" in headers
    assert path_.endswith("/")


def test_the_operation_ids_are_the_published_ones():
    assert sorted(spec["operationId"] for *_, spec in OPERATIONS) == sorted(
        [
            "releases_list",
            "release_retrieve",
            "tokens_list",
            "tokens_create",
            "token_revoke",
            "license_retrieve",
            "license_accept",
            "applications_list",
            "applications_create",
            "application_retrieve",
            "application_update",
            "application_submit",
            "application_withdraw",
            "application_answer",
            "review_applications_list",
            "review_application_retrieve",
            "review_application_approve",
            "review_application_reject",
            "review_application_request_info",
            "review_application_revoke",
            "review_application_claim",
            "review_application_release_claim",
            "review_grants_list",
            "review_grants_create",
            "review_grant_revoke",
            "grants_list",
            "grant_retrieve",
            "grant_links_create",
            "demo_generate",
            "demo_cancel",
        ]
    )


def test_the_envelope_component_and_the_token_scheme_say_what_they_are():
    envelope = SCHEMA["components"]["schemas"]["ErrorEnvelope"]
    assert set(envelope["properties"]) == ENVELOPE
    assert set(envelope["required"]) == ENVELOPE
    scheme = SCHEMA["components"]["securitySchemes"]["apiToken"]["description"]
    assert "/account/api-tokens/" in scheme and "POST /api/tokens/" in scheme
    tokens_create = SCHEMA["paths"]["/api/tokens/"]["post"]
    assert tokens_create["security"] == [{"cookieAuth": []}]
    anonymous = SCHEMA["paths"]["/api/releases/"]["get"]["security"]
    assert {} in anonymous
    queue = SCHEMA["paths"]["/api/review/applications/"]["get"]
    assert {"updated_since", "ordering", "release", "status"} <= {
        p["name"] for p in queue["parameters"]
    }
