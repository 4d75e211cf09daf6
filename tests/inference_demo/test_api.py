"""The demo API: token-authenticated generation streamed as Server-Sent Events."""

# ruff: noqa: F811  (the fixtures imported from test_views are parameters here)

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import yaml
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from inference_demo.models import DemoRequest
from inference_demo.services import NOT_YOURS, QUOTA, TOO_MANY
from tests.inference_demo.test_views import (  # noqa: F401 (fixtures)
    BODY,
    DEMO,
    REFUSALS,
    demo_release,
    embedded,
    fake_transport,
    grantee,
    limits,
    person,
    read_events,
)
from tests.tokens import api_token

URL = f"/api/demo/{DEMO}/generate/"


def token_client(user) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token(user)}")
    return client


def post(client: APIClient, body, **extra):
    return client.post(URL, body, format="json", HTTP_ACCEPT="text/event-stream", **extra)


# --- gating ------------------------------------------------------------------------------


def test_anonymous_callers_must_authenticate(fake_transport, demo_release):
    response = post(APIClient(), BODY)
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "detail": "Authentication credentials were not provided.",
        "code": "not_authenticated",
        "errors": {},
    }
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert not DemoRequest.objects.exists()


@pytest.mark.parametrize("state", [s for s in REFUSALS if s != "anonymous"])
def test_callers_without_access_are_refused_with_the_reason(person, state, fake_transport):
    response = post(token_client(person(state)), BODY)
    code, message, action = REFUSALS[state]
    assert response.status_code == 403
    body = response.json()
    assert (set(body), body["code"], body["errors"]) == ({"detail", "code", "errors"}, code, {})
    assert body["detail"].startswith(message)
    if action:  # where to fix it is said in words: the envelope has no other key
        assert body["detail"] == f"{message} See http://testserver{action}"
    assert not DemoRequest.objects.exists()


def test_a_release_without_a_demo_is_not_found(grantee, fake_transport):
    response = token_client(grantee).post("/api/demo/llama-7b/generate/", BODY, format="json")
    assert response.status_code == 404
    assert response.json() == {
        "detail": "No demo for this release.",
        "code": "not_found",
        "errors": {},
    }


# --- streaming ----------------------------------------------------------------------------


def test_grantee_streams_events_with_a_token(grantee, fake_transport):
    response = post(token_client(grantee), BODY)
    assert response.status_code == 200
    assert response["X-Accel-Buffering"] == "no" and response["Cache-Control"] == "no-cache"
    events = read_events(response)
    row = DemoRequest.objects.get()
    assert events[0] == (
        "request",
        {"id": row.pk, "cancel_url": f"/api/demo/requests/{row.pk}/cancel/"},
    )
    assert [n for n, _ in events][-2:] == ["delta", "done"]
    assert row.client == "api"


def test_session_callers_need_the_csrf_token(grantee, fake_transport):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(grantee)
    response = post(client, BODY)
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]


@pytest.mark.django_db(transaction=True)
def test_grantee_generates_with_the_engine(grantee, embedded):
    response = post(token_client(grantee), {**BODY, "max_new_tokens": 10, "temperature": 0.8})
    assert response.status_code == 200
    events = read_events(response)
    names = [name for name, _ in events]
    assert names[0] == "request" and names[-1] == "done", events
    assert names.index("started") < names.index("delta")
    assert all(data["text"] for name, data in events if name == "delta")
    done = events[-1][1]
    assert set(done) == {
        "finish_reason",
        "tokens_in",
        "tokens_out",
        "ttft_ms",
        "tokens_per_s",
        "duration_ms",
    }
    row = DemoRequest.objects.get()
    assert (row.status, row.client, row.tokens_out) == ("done", "api", done["tokens_out"])
    assert 1 <= row.tokens_out <= 10 and row.duration_ms is not None


# --- bad input and limits -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({**BODY, "max_new_tokens": 10_000}, "max_new_tokens", "less than or equal to 256."),
        ({**BODY, "max_new_tokens": "many"}, "max_new_tokens", "A valid integer is required."),
        ({**BODY, "temperature": -1}, "temperature", "greater than or equal to 0."),
        ({**BODY, "top_p": 0}, "top_p", "Ensure this value is greater than 0."),
        ({**BODY, "seed": 2**40}, "seed", "less than or equal to 4294967295."),
        ({**BODY, "prompt": ["a", "list"]}, "prompt", "Not a valid string."),
        ({"max_new_tokens": 4}, "prompt", "This field is required."),
    ],
)
def test_invalid_bodies_get_field_messages(grantee, fake_transport, body, field, message):
    response = post(token_client(grantee), body)
    assert response.status_code == 400
    error = response.json()
    assert (error["code"], list(error["errors"])) == ("invalid", [field])
    assert error["errors"][field][0].endswith(message), error
    assert error["detail"] == f"Invalid input. {field}: {error['errors'][field][0]}"
    assert not DemoRequest.objects.exists()


def test_a_body_that_is_not_an_object_is_refused_as_a_whole(grantee, fake_transport):
    response = post(token_client(grantee), ["not", "an", "object"])
    assert response.status_code == 400
    assert response.json() == {
        "detail": "Invalid data. Expected a dictionary, but got list.",
        "code": "invalid",
        "errors": {},
    }


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b'{"prompt": "unterminated', "application/json"),
        (b'{"prompt": "\xff\xfe bad bytes"}', "application/json"),
        (b'{"prompt": "x", "temperature": NaN}', "application/json"),
        (b"prompt=hello", "application/x-www-form-urlencoded"),
        (b"", "application/json"),
    ],
)
def test_malformed_bodies_are_client_errors(grantee, fake_transport, raw, content_type):
    response = token_client(grantee).generic("POST", URL, raw, content_type=content_type)
    assert 400 <= response.status_code < 500, response.content
    assert set(response.json()) == {"detail", "code", "errors"}
    assert not DemoRequest.objects.exists()


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=2048)
def test_an_oversized_body_is_refused(grantee, fake_transport):
    raw = json.dumps({**BODY, "prompt": "x" * 4096}).encode()
    response = token_client(grantee).generic("POST", URL, raw, content_type="application/json")
    assert response.status_code == 413
    assert response.json() == {
        "detail": "Request body too large: the API accepts at most 2048 bytes.",
        "code": "body_too_large",
        "errors": {},
    }
    assert not DemoRequest.objects.exists()


@override_settings(DEMO_LIMITS=limits(max_prompt_chars=10))
def test_a_long_prompt_is_refused(grantee, fake_transport):
    response = post(token_client(grantee), {**BODY, "prompt": "y" * 11})
    assert response.status_code == 400
    message = "Keep the prompt under 10 characters (it has 11)."
    assert response.json() == {
        "detail": message,
        "code": "prompt_too_long",
        "errors": {"prompt": [message]},
    }


@override_settings(DEMO_LIMITS=limits(concurrent_per_user=2))
def test_concurrency_limit(grantee, demo_release, fake_transport):
    for _ in range(2):
        DemoRequest.objects.create(user=grantee, release=demo_release, prompt="p", status="running")
    response = post(token_client(grantee), BODY)
    assert response.status_code == 429
    assert response.json() == {"detail": TOO_MANY.format(n=2), "code": "too_many", "errors": {}}
    assert int(response["Retry-After"]) > 0
    assert DemoRequest.objects.count() == 2


@override_settings(DEMO_LIMITS=limits(daily_tokens=50))
def test_daily_quota(grantee, demo_release, fake_transport):
    DemoRequest.objects.create(
        user=grantee, release=demo_release, prompt="p", status="done", tokens_out=45
    )
    # The first request leaves the 24-hour window in 10 hours; only then do 8 tokens fit.
    DemoRequest.objects.filter(tokens_out=45).update(
        created_at=timezone.now() - timedelta(hours=14)
    )
    response = post(token_client(grantee), {**BODY, "max_new_tokens": 8})
    assert response.status_code == 429
    assert response.json() == {
        "detail": QUOTA.format(quota=50, left=5, asked=8),
        "code": "quota",
        "errors": {},
    }
    assert abs(int(response["Retry-After"]) - 10 * 3600) < 60
    assert DemoRequest.objects.count() == 1


# --- cancel and schema ----------------------------------------------------------------------


def test_cancel_is_scoped_to_the_owner(grantee, charlie, demo_release, fake_transport):
    row = DemoRequest.objects.create(user=grantee, release=demo_release, prompt="p")
    url = f"/api/demo/requests/{row.pk}/cancel/"
    response = token_client(charlie).post(url)
    assert response.status_code == 404
    assert response.json() == {"detail": NOT_YOURS, "code": "not_found", "errors": {}}
    assert fake_transport.cancelled == []
    response = token_client(grantee).post(url)
    assert response.status_code == 200
    assert fake_transport.cancelled == [row.pk]


def test_the_schema_documents_the_stream(client):
    response = client.get("/api/schema/")
    assert response.status_code == 200
    schema = yaml.safe_load(response.content)
    operation = schema["paths"]["/api/demo/{slug}/generate/"]["post"]
    assert operation["operationId"] == "demo_generate"
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    for event in ("request", "queued", "started", "delta", "done", "error"):
        assert f"`{event}`" in operation["description"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    fields = schema["components"]["schemas"][body.rsplit("/", 1)[1]]["properties"]
    assert set(fields) == {"prompt", "max_new_tokens", "temperature", "top_p", "seed"}
    for status in ("400", "401", "403", "404", "429"):
        error = operation["responses"][status]["content"]["application/json"]["schema"]
        assert error["$ref"] == "#/components/schemas/ErrorEnvelope"
    assert "action_url" not in operation["description"]
    assert "/api/demo/requests/{id}/cancel/" in schema["paths"]
