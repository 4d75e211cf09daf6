"""The demo pages: gating, the event stream, limits, Stop, and the admin list.

Most tests stand a fake transport in for the engine, so that they check this layer's
own work (gating, parsing, framing, closing); `test_grantee_generates_with_the_engine`
goes through the real transport and the bundled demo model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from django.conf import settings
from django.test import override_settings
from django.urls import reverse

from access.models import Grant
from access.services.licenses import license_publish
from access.services.reviews import application_approve, grant_revoke
from inference_demo import views
from inference_demo.models import DemoRequest
from inference_demo.services import NOT_YOURS, PROMPT_EMPTY, PROMPT_TOO_LONG, QUOTA, TOO_MANY
from tests.factories import ReleaseFactory

DEMO = "llama-demo"
PAGE = f"/demo/{DEMO}/"
GENERATE = f"/demo/{DEMO}/generate/"
BODY = {"prompt": "Once upon a time", "max_new_tokens": 8, "temperature": 0, "top_p": 1, "seed": 3}

# What each person is told; action is where the page sends them (None: a login redirect).
REFUSALS = {
    "anonymous": ("sign_in", "Sign in to use this release.", "/accounts/login/"),
    "no_grant": ("no_grant", "You have no access to LLaMA demo. Apply for it first.", "/apply/"),
    "pending": ("pending", "Your application for LLaMA demo is being reviewed.", None),
    "license_superseded": (
        "license_not_accepted",
        "The license changed to version 2. Accept it to continue using LLaMA demo.",
        "/license/accept/",
    ),
    "revoked": ("revoked", "Your access to LLaMA demo was revoked.", "/applications/"),
}


# --- fixtures shared with test_api -----------------------------------------------------


@pytest.fixture
def demo_release(releases):
    releases[DEMO] = ReleaseFactory(slug=DEMO, name="LLaMA demo", sort_order=10)
    return releases[DEMO]


@pytest.fixture
def grantee(alice, reviewer, make_submitted, demo_release):
    application = make_submitted(alice, slugs=(DEMO,))
    application_approve(application=application, reviewer=reviewer, releases=[demo_release])
    return alice


@pytest.fixture
def person(request, bob, reviewer, make_submitted, demo_release):
    """Make the user of a gating state (None for anonymous); `request.param` names it."""

    def make(state: str):
        if state == "anonymous":
            return None
        if state == "no_grant":
            return bob
        if state == "pending":
            make_submitted(bob, slugs=(DEMO,))
            return bob
        user = request.getfixturevalue("grantee")
        if state == "license_superseded":
            license_publish(name="LLaMA license", version="2", text="Version 2 of the license.")
        elif state == "revoked":
            grant = Grant.objects.get(user=user, release=demo_release)
            grant_revoke(grant=grant, reviewer=reviewer, reason="Shared the weights.")
        return user

    return make


class FakeTransport:
    """Plays the transport contract: a few events per request, cancel and close recorded."""

    def __init__(self, deltas=("Once", " upon", " a time"), end=None, fail_after=None):
        self.deltas, self.end, self.fail_after = deltas, end, fail_after
        self.available = True
        self.cancelled: list[int] = []
        self.closed: list[int] = []

    def stream_request(self, demo_request: DemoRequest) -> Iterator[dict]:
        pk = demo_request.pk
        try:
            yield {"event": "queued", "position": 1}
            yield {"event": "queued", "position": 0}
            yield {"event": "started"}
            for i, text in enumerate(self.deltas):
                if i == self.fail_after:
                    raise RuntimeError("engine exploded")
                yield {"event": "delta", "text": text}
            if self.end is not False:
                yield self.end or {
                    "event": "done",
                    "finish_reason": "length",
                    "tokens_in": 5,
                    "tokens_out": len(self.deltas),
                    "ttft_ms": 12,
                    "tokens_per_s": 99.5,
                    "duration_ms": 40,
                }
        finally:
            self.closed.append(pk)

    def cancel_request(self, request_id: int) -> None:
        self.cancelled.append(int(request_id))

    def demo_available(self, slug: str) -> bool:
        return self.available


@pytest.fixture
def fake_transport(monkeypatch) -> FakeTransport:
    fake = FakeTransport()
    for name in ("stream_request", "cancel_request", "demo_available"):
        monkeypatch.setattr(views.transport, name, getattr(fake, name))
    return fake


@pytest.fixture
def embedded(settings):
    """The engine in this process on the CPU (make run's mode), whatever the environment says."""
    settings.DEMO_TRANSPORT = "inprocess"
    settings.DEMO_DEVICE = "cpu"


def parse_events(raw: bytes) -> list[tuple[str, dict]]:
    events = []
    for frame in raw.decode().split("\n\n"):
        if not frame:
            continue
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def read_events(response) -> list[tuple[str, dict]]:
    assert response["Content-Type"] == "text/event-stream"
    return parse_events(b"".join(response.streaming_content))


def limits(**changes) -> dict:
    return {**settings.DEMO_LIMITS, **changes}


# --- gating ------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(REFUSALS))
def test_page_refuses_with_the_reason(client, person, state, fake_transport):
    user = person(state)
    if user:
        client.force_login(user)
    response = client.get(PAGE)
    code, message, action = REFUSALS[state]
    if state == "anonymous":
        assert response.status_code == 302
        assert response["Location"] == f"{reverse('account_login')}?next={quote(PAGE)}"
        return
    assert response.status_code == 403
    page = response.content.decode()
    assert message in page
    assert f'data-reason="{code}"' in page
    assert 'id="demo-form"' not in page
    if action:
        assert f'href="{action}"' in page
    else:  # pending: the link goes to that application
        assert 'href="/applications/' in page


@pytest.mark.parametrize("state", list(REFUSALS))
def test_generate_refuses_with_json_and_creates_nothing(client, person, state, fake_transport):
    user = person(state)
    if user:
        client.force_login(user)
    response = client.post(GENERATE, BODY)
    code, message, action = REFUSALS[state]
    assert response.status_code == 403
    body = response.json()
    assert (body["error"], body["detail"]) == (code, message)
    if action:
        assert body["action_url"] == action
    assert not DemoRequest.objects.exists()
    assert fake_transport.closed == []


def test_grantee_sees_the_demo_page(client, grantee, fake_transport):
    client.force_login(grantee)
    response = client.get(PAGE)
    assert response.status_code == 200
    page = response.content.decode()
    caps = settings.DEMO_LIMITS
    assert 'id="demo-form"' in page and 'aria-live="polite"' in page
    assert f'action="{GENERATE}"' in page
    assert f'name="max_new_tokens" inputmode="numeric" min="1" max="{caps["max_new_tokens"]}"' in (
        page
    )
    assert f'max="{caps["max_temperature"]}"' in page
    assert f'maxlength="{caps["max_prompt_chars"]}"' in page
    assert '<label for="id_prompt">' in page and 'id="demo-stop"' in page
    assert 'id="demo-unavailable" class="notice" role="alert" hidden' in page


def test_page_says_when_the_demo_is_unavailable(client, grantee, fake_transport):
    fake_transport.available = False
    client.force_login(grantee)
    page = client.get(PAGE).content.decode()
    assert 'id="demo-unavailable" class="notice" role="alert">The demo is unavailable' in page


def test_releases_without_a_demo_are_not_found(client, grantee, releases):
    client.force_login(grantee)
    assert client.get("/demo/llama-7b/").status_code == 404
    assert client.post("/demo/llama-7b/generate/", BODY).status_code == 404
    assert client.get("/demo/no-such-release/").status_code == 404


def test_demo_list_offers_the_demo_or_says_why_not(client, grantee, bob, demo_release):
    client.force_login(grantee)
    assert f'href="{PAGE}">Try LLaMA demo' in client.get("/demo/").content.decode()
    client.force_login(bob)
    page = client.get("/demo/").content.decode()
    assert "You have no access to LLaMA demo. Apply for it first." in page
    assert 'href="/apply/"' in page
    client.logout()
    page = client.get("/demo/").content.decode()
    assert f'href="/accounts/login/?next={PAGE}"' in page


# --- the event stream -----------------------------------------------------------------


def test_grantee_generates_and_reads_events(client, grantee, fake_transport):
    client.force_login(grantee)
    response = client.post(GENERATE, BODY)
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Accel-Buffering"] == "no"
    events = read_events(response)
    row = DemoRequest.objects.get()
    assert [name for name, _ in events] == [
        "request",
        "queued",
        "queued",
        "started",
        "delta",
        "delta",
        "delta",
        "done",
    ]
    assert events[0][1] == {"id": row.pk, "cancel_url": f"/demo/requests/{row.pk}/cancel/"}
    assert events[1][1] == {"position": 1}
    assert "".join(d["text"] for name, d in events if name == "delta") == "Once upon a time"
    assert events[-1][1]["tokens_per_s"] == 99.5
    assert (row.user, row.client, row.prompt) == (grantee, "web", "Once upon a time")
    assert row.params == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": 3}
    assert fake_transport.closed == [row.pk]


def test_frames_are_sse(client, grantee, fake_transport):
    fake_transport.deltas = ("a\nb", " ünï")
    client.force_login(grantee)
    raw = b"".join(client.post(GENERATE, BODY).streaming_content).decode()
    assert 'event: delta\ndata: {"text":"a\\nb"}\n\n' in raw
    assert 'event: delta\ndata: {"text":" ünï"}\n\n' in raw


def test_defaults_fill_missing_parameters(client, grantee, fake_transport):
    client.force_login(grantee)
    response = client.post(GENERATE, {"prompt": "Hello", "seed": ""})
    assert response.status_code == 200
    read_events(response)
    assert DemoRequest.objects.get().params == {
        "max_new_tokens": 128,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 0,
    }


@pytest.mark.django_db(transaction=True)
def test_closing_the_response_closes_the_transport_stream(client, grantee, fake_transport):
    """A client that goes away closes the response; the transport then cancels the request."""
    client.force_login(grantee)
    response = client.post(GENERATE, BODY)
    chunks = iter(response.streaming_content)
    assert next(chunks).startswith(b"event: request\n")
    assert next(chunks).startswith(b"event: queued\n")
    assert fake_transport.closed == []
    response.close()  # as a server does: this also closes the database connection
    assert fake_transport.closed == [DemoRequest.objects.get().pk]


def test_a_stream_that_fails_ends_with_an_error_event(client, grantee, fake_transport):
    fake_transport.fail_after = 1
    client.force_login(grantee)
    events = read_events(client.post(GENERATE, BODY))
    assert [name for name, _ in events][-3:] == ["started", "delta", "error"]
    assert events[-1][1]["code"] == "broken"
    row = DemoRequest.objects.get()
    assert fake_transport.closed == [row.pk]
    assert row.status == "failed" and "engine exploded" in row.error  # its slot is free again


def test_a_stream_that_stops_short_ends_with_an_error_event(client, grantee, fake_transport):
    fake_transport.end = False
    client.force_login(grantee)
    events = read_events(client.post(GENERATE, BODY))
    assert events[-1] == ("error", {"code": "broken", "message": views.sse.BROKEN})


def test_the_unavailable_error_event_is_relayed(client, grantee, fake_transport):
    unavailable = {"event": "error", "code": "unavailable", "message": "The demo is unavailable."}
    fake_transport.deltas, fake_transport.end = (), unavailable
    client.force_login(grantee)
    events = read_events(client.post(GENERATE, BODY))
    assert events[-1] == ("error", {"code": "unavailable", "message": "The demo is unavailable."})


def test_generate_needs_the_csrf_token(grantee, fake_transport):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(grantee)
    assert client.post(GENERATE, BODY).status_code == 403
    assert not DemoRequest.objects.exists()


# --- input and limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_new_tokens": settings.DEMO_LIMITS["max_new_tokens"] + 1}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": settings.DEMO_LIMITS["max_temperature"] + 0.5}, "temperature"),
        ({"temperature": "nan"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_parameters_are_refused_per_field(client, grantee, fake_transport, change, field):
    client.force_login(grantee)
    response = client.post(GENERATE, {**BODY, **change})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_params"
    assert list(body["errors"]) == [field]
    assert body["detail"].startswith(f"Check the request: {field}: ")
    assert not DemoRequest.objects.exists()


def test_a_missing_prompt_is_refused(client, grantee, fake_transport):
    client.force_login(grantee)
    response = client.post(GENERATE, {"max_new_tokens": 4})
    assert response.status_code == 400
    assert response.json()["errors"] == {"prompt": ["This field is required."]}


def test_an_empty_prompt_is_refused(client, grantee, fake_transport):
    client.force_login(grantee)
    response = client.post(GENERATE, {**BODY, "prompt": "   "})
    assert response.status_code == 400
    assert response.json() == {"error": "prompt_empty", "detail": PROMPT_EMPTY, "action_url": ""}


@override_settings(DEMO_LIMITS=limits(max_prompt_chars=20))
def test_a_long_prompt_is_refused(client, grantee, fake_transport):
    client.force_login(grantee)
    response = client.post(GENERATE, {**BODY, "prompt": "x" * 21})
    assert response.status_code == 400
    assert response.json()["error"] == "prompt_too_long"
    assert response.json()["detail"] == PROMPT_TOO_LONG.format(limit=20, n=21)
    assert not DemoRequest.objects.exists()


@override_settings(DEMO_LIMITS=limits(concurrent_per_user=1))
def test_concurrency_limit(client, grantee, demo_release, fake_transport):
    DemoRequest.objects.create(user=grantee, release=demo_release, prompt="first", params={})
    client.force_login(grantee)
    response = client.post(GENERATE, BODY)
    assert response.status_code == 429
    assert response.json()["error"] == "too_many"
    assert response.json()["detail"] == TOO_MANY.format(n=1)
    assert DemoRequest.objects.count() == 1


@override_settings(DEMO_LIMITS=limits(daily_tokens=100))
def test_daily_quota(client, grantee, demo_release, fake_transport):
    DemoRequest.objects.create(
        user=grantee, release=demo_release, prompt="earlier", status="done", tokens_out=90
    )
    client.force_login(grantee)
    response = client.post(GENERATE, {**BODY, "max_new_tokens": 20})
    assert response.status_code == 429
    assert response.json() == {
        "error": "quota",
        "detail": QUOTA.format(quota=100, left=10, asked=20),
        "action_url": "",
    }
    assert DemoRequest.objects.count() == 1
    read_events(client.post(GENERATE, {**BODY, "max_new_tokens": 10}))  # what is left still works
    assert DemoRequest.objects.count() == 2


@override_settings(DEMO_LIMITS=limits(max_new_tokens=16))
def test_caps_come_from_settings(client, grantee, fake_transport):
    client.force_login(grantee)
    assert 'max="16"' in client.get(PAGE).content.decode()
    assert client.post(GENERATE, {**BODY, "max_new_tokens": 17}).status_code == 400
    response = client.post(GENERATE, {"prompt": "Hi"})  # the default fits under the cap
    read_events(response)
    assert DemoRequest.objects.get().params["max_new_tokens"] == 16


# --- Stop ------------------------------------------------------------------------------


def test_owner_cancels_a_request(client, grantee, demo_release, fake_transport):
    row = DemoRequest.objects.create(user=grantee, release=demo_release, prompt="p", params={})
    client.force_login(grantee)
    response = client.post(f"/demo/requests/{row.pk}/cancel/")
    assert response.status_code == 200
    assert response.json() == {"id": row.pk, "cancelled": True}
    assert fake_transport.cancelled == [row.pk]


def test_charlie_cannot_cancel_alices_request(
    client, grantee, charlie, demo_release, fake_transport
):
    row = DemoRequest.objects.create(user=grantee, release=demo_release, prompt="p", params={})
    client.force_login(charlie)
    response = client.post(f"/demo/requests/{row.pk}/cancel/")
    assert response.status_code == 404
    assert response.json()["detail"] == NOT_YOURS
    client.logout()
    assert client.post(f"/demo/requests/{row.pk}/cancel/").status_code == 404
    assert fake_transport.cancelled == []


# --- admin ------------------------------------------------------------------------------


def test_reviewer_sees_demo_requests_in_the_admin(reviewer_client, grantee, demo_release):
    row = DemoRequest.objects.create(
        user=grantee,
        release=demo_release,
        prompt="Tell me a secret",
        params={"max_new_tokens": 8, "temperature": 0.5, "top_p": 0.9, "seed": 1},
        status="done",
        tokens_in=4,
        tokens_out=8,
        ttft_ms=15,
        duration_ms=90,
    )
    url = reverse("admin:inference_demo_demorequest_changelist")
    page = reviewer_client.get(url).content.decode()
    assert "alice" in page and "LLaMA demo" in page
    assert f"older than {settings.DEMO_RETENTION_DAYS} days are purged" in page
    found = reviewer_client.get(url, {"q": "secret"}).content.decode()
    assert f"/admin/inference_demo/demorequest/{row.pk}/change/" in found
    missing = reviewer_client.get(url, {"q": "nothing-like-this"}).content.decode()
    assert f"/admin/inference_demo/demorequest/{row.pk}/change/" not in missing
    assert reviewer_client.get(url, {"q": "alice@uni"}).status_code == 200
    assert reviewer_client.get(url, {"status__exact": "done", "client": "web"}).status_code == 200
    detail = reviewer_client.get(reverse("admin:inference_demo_demorequest_change", args=[row.pk]))
    assert detail.status_code == 200
    assert "Tell me a secret" in detail.content.decode()
    assert "&quot;temperature&quot;: 0.5" in detail.content.decode()
    assert reviewer_client.get(reverse("admin:inference_demo_demorequest_add")).status_code == 403
    delete = reverse("admin:inference_demo_demorequest_delete", args=[row.pk])
    assert reviewer_client.post(delete, {"post": "yes"}).status_code == 403
    assert DemoRequest.objects.filter(pk=row.pk).exists()


# --- the real engine -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_grantee_generates_with_the_engine(client, grantee, embedded):
    client.force_login(grantee)
    response = client.post(GENERATE, {**BODY, "max_new_tokens": 12})
    assert response.status_code == 200
    events = read_events(response)
    names = [name for name, _ in events]
    assert names[0] == "request" and names[-1] == "done", events
    assert "started" in names
    deltas = [data["text"] for name, data in events if name == "delta"]
    assert deltas and all(deltas)
    assert names.index("started") < names.index("delta")
    done = events[-1][1]
    assert done["tokens_out"] == 12 and done["tokens_in"] > 0
    assert done["ttft_ms"] >= 0 and done["tokens_per_s"] > 0
    row = DemoRequest.objects.get()
    assert (row.status, row.client, row.tokens_out) == ("done", "web", 12)
    assert row.tokens_in == done["tokens_in"] and row.ttft_ms is not None


@pytest.mark.django_db(transaction=True)
def test_a_client_that_goes_away_cancels_the_engine_request(client, grantee, embedded):
    client.force_login(grantee)
    response = client.post(GENERATE, {**BODY, "max_new_tokens": 200})
    chunks = iter(response.streaming_content)
    while not next(chunks).startswith(b"event: delta"):
        pass
    response.close()
    row = DemoRequest.objects.get()
    assert row.status == "cancelled"
    assert row.tokens_out < 200
