"""The OpenAI API on the portal (/api/v1/), driven by the official `openai` client against
a real gunicorn with the bundled demo model in its worker (embedded mode, in-process
transport), on the test database.

Grantees stream and complete with a portal API token as the API key; every refusal the
demo's rules make (no grant, revoked, pending, license, quota, concurrency, limits) is
the exception class the client raises for its status, with the portal's words, and writes
no record; what runs is recorded as `DemoRequest(client="openai")`. The last tests use
Django's client and a fake transport for what a real engine does not do on request (a
transport that breaks mid-stream) and for the framing of bad requests.
"""

# ruff: noqa: F811  (the fixtures imported from test_views are parameters here)

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from access.tokens import token_create
from inference_demo.models import DemoRequest
from inference_demo.openai_api import NO_TOP_K, REQUEST_ID_HEADER
from inference_demo.services import QUOTA, TOO_MANY
from tests.inference_demo.test_views import (  # noqa: F401 (fixtures)
    DEMO,
    REFUSALS,
    FakeTransport,
    demo_release,
    fake_transport,
    grantee,
    person,
)
from tests.servers import SERVER_SECRET_KEY, portal_gunicorn

pytestmark = pytest.mark.django_db(transaction=True)

PROMPT = "The for statement"
CAP = settings.DEMO_LIMITS["max_new_tokens"]  # the server runs with the same defaults
CHAT = [{"role": "user", "content": "What does the for statement do?"}]


@pytest.fixture(scope="module")
def portal(django_db_setup, tmp_path_factory) -> Iterator[str]:
    """gunicorn as deployed, one worker (one engine to load), the demo on its CPU."""
    tmp = tmp_path_factory.mktemp("openai-portal")
    env = {"GUNICORN_WORKERS": "1", "DEMO_TRANSPORT": "inprocess", "DEMO_DEVICE": "cpu"}
    with portal_gunicorn(tmp, env) as (port, _log):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def _server_settles(portal, settings, monkeypatch):
    settings.SECRET_KEY = SERVER_SECRET_KEY  # tokens are stamped with the server's key
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield
    # The server records a request's end just after its last byte (or after the client
    # went away); the test database must not be flushed under that write.
    deadline = time.monotonic() + 10
    while DemoRequest.objects.filter(status__in=DemoRequest.OPEN_STATUSES).exists():
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)


def token(user) -> str:
    return token_create(user=user, name="openai", second_factor=False).secret


def client_for(portal: str, user=None, *, key: str | None = None) -> openai.OpenAI:
    # The openai client retries 429s and 5xx by default; each answer is checked here.
    return openai.OpenAI(
        base_url=f"{portal}/api/v1", api_key=key or token(user), max_retries=0, timeout=60
    )


def rows() -> list[DemoRequest]:
    return list(DemoRequest.objects.order_by("pk"))


# --- generation ----------------------------------------------------------------------------


def test_a_streamed_completion_is_text_and_one_record(portal, grantee):
    client = client_for(portal, grantee)
    chunks = list(
        client.completions.create(
            model=DEMO, prompt=PROMPT, max_tokens=8, temperature=0, seed=1, stream=True
        )
    )
    assert {c.object for c in chunks} == {"text_completion"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert chunks[0].model == DEMO
    text = "".join(c.choices[0].text for c in chunks)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    [row] = rows()
    assert (row.client, row.status, row.tokens_out, row.finish_reason) == (
        "openai",
        "done",
        8,
        "length",
    )
    assert (row.user, row.release.slug, row.prompt) == (grantee, DEMO, PROMPT)
    assert row.params == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 1}
    # The same request without streaming: the same greedy text, assembled from the events.
    whole = client.completions.create(model=DEMO, prompt=PROMPT, max_tokens=8, temperature=0)
    assert whole.choices[0].text == text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (row.tokens_in, 8)
    assert whole.usage.total_tokens == row.tokens_in + 8
    assert [r.client for r in rows()] == ["openai", "openai"]


def test_a_stop_sequence_cuts_the_text_before_it(portal, grantee):
    client = client_for(portal, grantee)
    whole = client.completions.create(model=DEMO, prompt=PROMPT, max_tokens=24, temperature=0)
    text = whole.choices[0].text
    stop = text.strip()[len(text.strip()) // 2 :][:3]  # a piece from the middle of the text
    cut = client.completions.create(
        model=DEMO, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    assert [r.params.get("stop") for r in rows()] == [None, [stop]]


def test_a_chat_completion_has_the_message_and_the_recorded_usage(portal, grantee):
    client = client_for(portal, grantee)
    answer = client.chat.completions.create(
        model=DEMO, messages=CHAT, max_completion_tokens=6, temperature=0
    )
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.content
    [row] = rows()
    assert row.prompt == "User: What does the for statement do?\nAssistant:"
    assert (row.status, row.client) == ("done", "openai")
    assert answer.usage.prompt_tokens == row.tokens_in > 10
    assert answer.usage.completion_tokens == row.tokens_out
    assert choice.finish_reason == row.finish_reason
    assert 1 <= row.tokens_out <= 6


def test_a_chat_stream_opens_with_the_role_and_ends_with_the_usage(portal, grantee):
    stream = client_for(portal, grantee).chat.completions.create(
        model=DEMO,
        messages=CHAT,
        max_tokens=5,
        temperature=0.8,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, finish, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in body)
    assert finish.choices[0].finish_reason in ("length", "stop")
    assert last.choices == [] and all(c.usage is None for c in chunks[:-1])
    [row] = rows()
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        row.tokens_in,
        row.tokens_out,
    )
    assert row.params["seed"] == 7 and row.params["temperature"] == 0.8


def test_the_models_are_the_demos_the_token_may_use(portal, grantee, bob):
    client = client_for(portal, grantee)
    listed = client.models.list()
    assert [m.id for m in listed.data] == [DEMO]
    assert listed.data[0].object == "model"
    assert client.models.retrieve(DEMO).id == DEMO
    assert client_for(portal, bob).models.list().data == []
    with pytest.raises(openai.PermissionDeniedError, match="Apply for it first"):
        client_for(portal, bob).models.retrieve(DEMO)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("llama-7b")  # a release without a demo


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["no_grant", "pending", "revoked", "license_superseded"])
def test_without_access_the_client_raises_permission_denied(portal, person, state):
    code, message, action = REFUSALS[state]
    client = client_for(portal, person(state))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.completions.create(model=DEMO, prompt=PROMPT, max_tokens=4)
    error = caught.value
    assert error.status_code == 403 and error.code == code
    assert error.body["type"] == "permission_error"
    # Where to fix it, as an address: pending points at that application.
    where = action or "/applications/"
    assert error.body["message"].startswith(f"{message} See {portal}{where}")
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=DEMO, messages=CHAT, stream=True)
    assert rows() == []


def test_a_used_daily_quota_is_a_rate_limit_with_retry_after(portal, grantee, demo_release):
    quota = settings.DEMO_LIMITS["daily_tokens"]
    DemoRequest.objects.create(
        user=grantee, release=demo_release, prompt="p", status="done", tokens_out=quota - 4
    )
    DemoRequest.objects.update(created_at=timezone.now() - timedelta(hours=20))
    client = client_for(portal, grantee)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model=DEMO, prompt=PROMPT, max_tokens=8)
    error = caught.value
    assert (error.status_code, error.code) == (429, "quota")
    assert error.body["message"] == QUOTA.format(quota=quota, left=4, asked=8)
    # The 20-hour-old request leaves the 24-hour window in 4 hours.
    assert abs(int(error.response.headers["Retry-After"]) - 4 * 3600) < 60
    assert len(rows()) == 1
    # What is left is still usable.
    done = client.completions.create(model=DEMO, prompt=PROMPT, max_tokens=4)
    assert done.usage.completion_tokens == 4


def test_running_requests_over_the_limit_are_a_rate_limit(portal, grantee, demo_release):
    limit = settings.DEMO_LIMITS["concurrent_per_user"]
    for _ in range(limit):
        DemoRequest.objects.create(user=grantee, release=demo_release, prompt="p", status="running")
    with pytest.raises(openai.RateLimitError) as caught:
        client_for(portal, grantee).chat.completions.create(model=DEMO, messages=CHAT)
    assert caught.value.code == "too_many"
    assert caught.value.body["message"] == TOO_MANY.format(n=limit)
    assert int(caught.value.response.headers["Retry-After"]) > 0
    assert len(rows()) == limit
    DemoRequest.objects.update(status="done")  # nothing left open for the teardown to wait on


def test_a_bad_or_missing_token_is_an_authentication_error(portal, grantee):
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(portal, key="lap_" + "0" * 64).completions.create(
            model=DEMO, prompt=PROMPT, max_tokens=4
        )
    assert caught.value.code == "invalid_api_key"
    assert caught.value.body["message"] == (
        f"Invalid token. Create a new portal API token at {portal}/account/api-tokens/"
    )
    assert caught.value.response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    anonymous = httpx.get(f"{portal}/api/v1/models")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["message"].startswith("You didn't provide an API key.")
    assert rows() == []


def test_an_unknown_model_is_not_found(portal, grantee):
    client = client_for(portal, grantee)
    for model in ("gpt-4o", "llama-7b"):  # not a release; a release without a demo
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=4)
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
        assert caught.value.body["message"] == f"The model '{model}' does not exist"
    assert rows() == []


@pytest.mark.parametrize(
    ("kind", "extra", "param", "message"),
    [
        (
            "completion",
            {"max_tokens": CAP + 1},
            "max_tokens",
            f"max_tokens must be at most {CAP} on this portal's demo, got {CAP + 1}",
        ),
        (
            "chat",
            {"max_completion_tokens": 10_000},
            "max_completion_tokens",
            f"max_completion_tokens must be at most {CAP} on this portal's demo, got 10000",
        ),
        ("completion", {"stop": ["x" * 65]}, "stop", "stop sequences are at most 64 characters"),
        (
            "completion",
            {"stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "stop takes at most 4 sequences",
        ),
        ("chat", {"extra_body": {"top_k": 5}}, "top_k", NO_TOP_K),
        ("completion", {"temperature": 2.5}, "temperature", "temperature must be a number"),
        ("completion", {"n": 2}, "n", "n is not supported by this server"),
        ("chat", {"extra_body": {"foo": 1}}, "foo", "Unrecognized request argument"),
    ],
)
def test_bad_parameters_are_a_bad_request_naming_them(portal, grantee, kind, extra, param, message):
    client = client_for(portal, grantee)
    with pytest.raises(openai.BadRequestError) as caught:
        if kind == "completion":
            client.completions.create(model=DEMO, prompt=PROMPT, **extra)
        else:
            client.chat.completions.create(model=DEMO, messages=CHAT, **extra)
    assert caught.value.param == param
    assert caught.value.body["message"].startswith(message)
    assert rows() == []


def test_a_prompt_over_the_portals_limit_is_a_bad_request(portal, grantee):
    limit = settings.DEMO_LIMITS["max_prompt_chars"]
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(portal, grantee).completions.create(model=DEMO, prompt="x" * (limit + 1))
    assert (caught.value.code, caught.value.param) == ("prompt_too_long", "prompt")
    assert caught.value.body["message"] == (
        f"Keep the prompt under {limit} characters (it has {limit + 1})."
    )
    assert rows() == []


def test_a_prompt_over_the_models_context_is_a_bad_request_and_recorded(portal, grantee):
    # Within the portal's character limit, beyond the model's 1024-token context: only the
    # engine can tell, after the request was made (and recorded, as on the demo page).
    prompt = "\u6f22" * (settings.DEMO_LIMITS["max_prompt_chars"] - 10)
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(portal, grantee).completions.create(model=DEMO, prompt=prompt, max_tokens=4)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "prompt")
    assert caught.value.body["message"].startswith("The prompt is too long for this model")
    [row] = rows()
    assert (row.status, row.client) == ("failed", "openai")
    assert row.error.startswith("prompt_too_long")


# --- stopping -------------------------------------------------------------------------------


def test_a_stop_mid_stream_arrives_as_an_error_in_the_stream(portal, grantee):
    key = token(grantee)
    client = client_for(portal, key=key)
    with client.completions.with_streaming_response.create(
        model=DEMO, prompt=PROMPT, max_tokens=CAP, stream=True
    ) as response:
        request_id = int(response.headers[REQUEST_ID_HEADER])
        stream = iter(response.parse())
        assert next(stream).choices[0].text is not None
        cancelled = httpx.post(
            f"{portal}/api/demo/requests/{request_id}/cancel/",
            headers={"Authorization": f"Bearer {key}"},
        )
        assert cancelled.json() == {"id": request_id, "cancelled": True}
        with pytest.raises(openai.APIError, match="Stopped."):
            for _ in stream:
                pass
    row = DemoRequest.objects.get(pk=request_id)
    assert (row.status, row.finish_reason) == ("cancelled", "cancelled")
    assert row.tokens_out < CAP


def _raw_stream(portal: str, key: str, body: dict) -> http.client.HTTPConnection:
    url = urlsplit(portal)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request(
        "POST",
        "/api/v1/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    return connection


def test_a_client_that_goes_away_cancels_its_request(portal, grantee):
    body = {"model": DEMO, "prompt": PROMPT, "max_tokens": CAP, "stream": True}
    connection = _raw_stream(portal, token(grantee), body)
    response = connection.getresponse()
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    received = b""
    while b"data: {" not in received:
        received += response.read1(4096)
    request_id = int(response.headers[REQUEST_ID_HEADER])
    response.close()  # mid-stream: gunicorn's next write fails and closes our iterator
    connection.close()
    deadline = time.monotonic() + 20
    while DemoRequest.objects.get(pk=request_id).is_open():
        assert time.monotonic() < deadline, "the request was never cancelled"
        time.sleep(0.05)
    row = DemoRequest.objects.get(pk=request_id)
    assert (row.status, row.finish_reason) == ("cancelled", "cancelled")
    assert row.tokens_out < CAP


def test_the_stream_is_sse_data_lines_ending_in_done(portal, grantee):
    body = {"model": DEMO, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    connection = _raw_stream(portal, token(grantee), body)
    with contextlib.closing(connection):
        raw = connection.getresponse().read().decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    data = [json.loads(f.removeprefix("data: ")) for f in frames[:-1] if f.startswith("data: ")]
    assert data and {d["object"] for d in data} == {"text_completion"}
    # Queue and start events are SSE comments, which the client skips.
    assert all(f.startswith(("data: ", ": ")) for f in frames)


# --- without a server: a broken transport, and the framing of bad requests ----------------


def bearer(user) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token(user)}"}


def post(client: Client, path: str, body, **extra):
    data = body if isinstance(body, bytes) else json.dumps(body)
    return client.post(f"/api/v1/{path}", data, content_type="application/json", **extra)


def test_a_transport_that_breaks_mid_stream_ends_with_an_error_and_no_done(grantee, monkeypatch):
    fake = FakeTransport(fail_after=1)
    monkeypatch.setattr("inference_demo.openai_api.transport.stream_request", fake.stream_request)
    body = {"model": DEMO, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    response = post(Client(), "completions", body, **bearer(grantee))
    assert response.status_code == 200
    raw = b"".join(response.streaming_content).decode()
    frames = [f for f in raw.split("\n\n") if f and not f.startswith(":")]
    assert "[DONE]" not in raw
    *texts, last = [json.loads(f.removeprefix("data: ")) for f in frames]
    assert [t["choices"][0]["text"] for t in texts] == ["Once"]
    assert last["error"]["code"] == "broken" and last["error"]["type"] == "server_error"
    row = DemoRequest.objects.get()
    assert (row.status, row.client) == ("failed", "openai")
    assert row.error.startswith("broken: RuntimeError('engine exploded')")
    assert fake.closed == [row.pk]


def test_a_transport_that_breaks_without_streaming_is_a_500(grantee, monkeypatch):
    fake = FakeTransport(fail_after=1)
    monkeypatch.setattr("inference_demo.openai_api.transport.stream_request", fake.stream_request)
    body = {"model": DEMO, "prompt": PROMPT, "max_tokens": 4}
    response = post(Client(), "completions", body, **bearer(grantee))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "broken"


def test_session_cookies_do_not_authenticate_and_csrf_is_not_asked(grantee):
    client = Client(enforce_csrf_checks=True)
    client.force_login(grantee)
    response = post(client, "completions", {"model": DEMO, "prompt": PROMPT})
    assert response.status_code == 401  # not 403 for CSRF: there is nothing of a session
    assert response.json()["error"]["message"].startswith("You didn't provide an API key.")
    assert not DemoRequest.objects.exists()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model": "llama-demo", "prompt": ', "The request body is not valid JSON"),
        (b'{"model": "llama-demo", "temperature": NaN}', "The request body is not valid JSON"),
        (b"\xff\xfe", "The request body is not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "The request body is nested too deeply"),
        (b'["llama-demo"]', "The request body must be a JSON object"),
        (b"{}", "you must provide a model parameter"),
    ],
)
def test_unusable_bodies_are_a_400_in_openais_shape(grantee, raw, message):
    response = post(Client(), "chat/completions", raw, **bearer(grantee))
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith(message) and error["type"] == "invalid_request_error"
    assert not DemoRequest.objects.exists()


def test_an_oversized_body_is_a_413(grantee, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    body = {"model": DEMO, "prompt": "x" * 4096}
    response = post(Client(), "completions", body, **bearer(grantee))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_wrong_methods_and_paths_answer_in_openais_shape(grantee):
    client = Client()
    response = client.get("/api/v1/completions", **bearer(grantee))
    assert response.status_code == 405 and response["Allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
    response = client.post("/api/v1/models", **bearer(grantee))
    assert response.status_code == 405 and response["Allow"] == "GET, HEAD"
    response = client.get("/api/v1/embeddings", **bearer(grantee))
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "Invalid URL (GET /api/v1/embeddings)",
        "type": "invalid_request_error",
        "param": None,
        "code": "unknown_url",
    }


def test_a_second_demo_release_is_listed_only_with_its_own_grant(grantee, settings):
    # llama-7b (from the catalogue) becomes a demo too; the grantee holds no grant for it.
    settings.DEMO_MODELS = {**settings.DEMO_MODELS, "llama-7b": settings.DEMO_MODELS[DEMO]}
    response = Client().get("/api/v1/models", **bearer(grantee))
    assert [m["id"] for m in response.json()["data"]] == [DEMO]


@pytest.mark.django_db
def test_the_token_rules_of_every_door_hold_here(grantee):
    """What ends a token elsewhere ends it here: a password change, a disabled account,
    a deleted token. Each is a 401 and writes no record."""
    headers = bearer(grantee)
    assert Client().get("/api/v1/models", **headers).status_code == 200

    grantee.set_password("a brand new passphrase 42")
    grantee.save()
    changed = Client().get("/api/v1/models", **headers)
    assert changed.status_code == 401
    assert "password changed" in changed.json()["error"]["message"]

    headers = bearer(grantee)
    type(grantee).objects.filter(pk=grantee.pk).update(is_active=False)
    refused = post(Client(), "completions", {"model": DEMO, "prompt": PROMPT}, **headers)
    assert refused.status_code == 401
    assert not DemoRequest.objects.exists()
