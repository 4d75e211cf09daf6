"""Working the queue as a team: claims in the service, the admin and the API; keys on the page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.messages import get_messages
from django.contrib.staticfiles import finders
from django.core.cache import cache
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from access import errors
from access.models import Application, Grant
from access.services import claims
from tests.factories import ReviewerFactory, UserFactory
from tests.tokens import api_token
from tests.twofactor import login_with_2fa

Status = Application.Status


@pytest.fixture(autouse=True)
def _fresh_cache():
    cache.clear()


@pytest.fixture
def olga(db):
    return ReviewerFactory(username="olga", email="olga@portal.example.org")


@pytest.fixture
def alice_app(alice, make_submitted):
    return make_submitted(alice)


def fresh(application: Application) -> Application:
    return Application.objects.select_related("claimed_by").get(pk=application.pk)


def change_url(application: Application) -> str:
    return reverse("admin:access_application_change", args=[application.pk])


def messages_of(response) -> list[str]:
    return [m.message for m in get_messages(response.wsgi_request)]


def expire(application: Application) -> None:
    Application.objects.filter(pk=application.pk).update(
        claimed_at=timezone.now() - timedelta(minutes=31)
    )


# --- the service ---------------------------------------------------------------


def test_claim_blocks_others_until_taken_over_or_expired(alice_app, reviewer, olga):
    state = claims.claim_take(application=alice_app, reviewer=reviewer)
    assert (state.holder_id, fresh(alice_app).claimed_by_id) == (reviewer.pk, reviewer.pk)

    with pytest.raises(errors.IllegalTransition) as refused:
        claims.claim_take(application=alice_app, reviewer=olga)
    assert refused.value.code == "claimed_by_other"
    assert reviewer.email in str(refused.value)
    assert fresh(alice_app).claimed_by_id == reviewer.pk
    with pytest.raises(errors.IllegalTransition):
        claims.claim_guard(application=alice_app, reviewer=olga)
    claims.claim_guard(application=alice_app, reviewer=reviewer)  # the holder may decide

    claims.claim_take(application=alice_app, reviewer=olga, takeover=True)
    assert fresh(alice_app).claimed_by_id == olga.pk

    expire(alice_app)
    assert not claims.claim_of(fresh(alice_app)).held
    claims.claim_guard(application=alice_app, reviewer=reviewer)  # an expired claim binds nobody
    claims.claim_take(application=alice_app, reviewer=reviewer)
    assert fresh(alice_app).claimed_by_id == reviewer.pk


def test_claim_is_a_conditional_update_not_read_then_write(alice_app, reviewer, olga):
    stale = Application.objects.get(pk=alice_app.pk)  # read before anyone claimed it
    claims.claim_take(application=alice_app, reviewer=reviewer)
    with pytest.raises(errors.IllegalTransition):
        claims.claim_take(application=stale, reviewer=olga)
    assert fresh(alice_app).claimed_by_id == reviewer.pk


@override_settings(PORTAL_REVIEW_CLAIM_MINUTES=5)
def test_claim_timeout_is_a_setting(alice_app, reviewer, olga):
    claims.claim_take(application=alice_app, reviewer=reviewer)
    Application.objects.filter(pk=alice_app.pk).update(
        claimed_at=timezone.now() - timedelta(minutes=6)
    )
    claims.claim_take(application=alice_app, reviewer=olga)
    assert fresh(alice_app).claimed_by_id == olga.pk


def test_release_and_reassign(alice_app, alice, reviewer, olga):
    claims.claim_take(application=alice_app, reviewer=reviewer)
    with pytest.raises(errors.IllegalTransition):
        claims.claim_release(application=alice_app, reviewer=olga)
    assert fresh(alice_app).claimed_by_id == reviewer.pk

    claims.claim_reassign(application=alice_app, reviewer=reviewer, to=olga)
    assert fresh(alice_app).claimed_by_id == olga.pk
    with pytest.raises(errors.IllegalTransition):  # no longer the holder
        claims.claim_reassign(application=alice_app, reviewer=reviewer, to=reviewer)

    for target in (alice, UserFactory(username="ned", is_staff=False)):
        with pytest.raises(errors.InvalidInput):
            claims.claim_reassign(application=alice_app, reviewer=olga, to=target)
    assert fresh(alice_app).claimed_by_id == olga.pk

    claims.claim_release(application=alice_app, reviewer=olga)
    assert (fresh(alice_app).claimed_by_id, fresh(alice_app).claimed_at) == (None, None)
    claims.claim_release(application=alice_app, reviewer=olga)  # releasing nothing is a no-op


def test_only_open_applications_of_others_can_be_claimed(alice_app, alice, reviewer, releases):
    alice.is_staff = True
    alice.save()
    with pytest.raises(errors.NotAllowed):
        claims.claim_take(application=alice_app, reviewer=alice)  # not a reviewer
    claims.claim_take(application=alice_app, reviewer=reviewer)
    from access.services.reviews import application_approve

    application_approve(application=alice_app, reviewer=reviewer, releases=[releases["llama-7b"]])
    # A decided application is held by nobody, whatever its columns still say.
    assert not claims.claim_of(fresh(alice_app)).held
    with pytest.raises(errors.IllegalTransition) as refused:
        claims.claim_take(application=alice_app, reviewer=reviewer)
    assert refused.value.code == "not_claimable"


# --- the admin -----------------------------------------------------------------


@pytest.fixture
def olga_client(olga, password):
    return login_with_2fa(Client(), olga, password)


def test_admin_claim_shows_holder_and_blocks_the_others_decisions(
    reviewer_client, reviewer, olga_client, olga, alice_app, releases
):
    response = reviewer_client.post(reverse("admin:access_application_claim", args=[alice_app.pk]))
    assert response.status_code == 302
    assert fresh(alice_app).claimed_by_id == reviewer.pk

    page = olga_client.get(change_url(alice_app)).content.decode()
    assert "Held by <strong>rita@portal.example.org</strong>" in page
    assert "Take over from rita@portal.example.org" in page
    queue = olga_client.get(reverse("admin:access_application_changelist")).content.decode()
    assert "rita@portal.example.org · 0 min" in queue

    approve = reverse("admin:access_application_approve", args=[alice_app.pk])
    response = olga_client.post(approve, {"releases": [releases["llama-7b"].pk], "note": ""})
    assert response.status_code == 302
    assert any("rita@portal.example.org holds this application" in m for m in messages_of(response))
    assert fresh(alice_app).status == Status.SUBMITTED
    assert not Grant.objects.exists()

    response = olga_client.post(
        reverse("admin:access_application_claim", args=[alice_app.pk]), {"takeover": "1"}
    )
    assert fresh(alice_app).claimed_by_id == olga.pk
    response = olga_client.post(approve, {"releases": [releases["llama-7b"].pk], "note": ""})
    application = fresh(alice_app)
    assert application.status == Status.APPROVED
    assert (application.claimed_by_id, application.claimed_at) == (None, None)  # decided: no claim
    assert Grant.objects.filter(application=alice_app, release=releases["llama-7b"]).count() == 1


def test_admin_bulk_decision_skips_rows_held_by_others(
    reviewer_client, olga, alice_app, bob, make_submitted
):
    bob_app = make_submitted(bob)
    claims.claim_take(application=bob_app, reviewer=olga)
    response = reviewer_client.post(
        reverse("admin:access_application_changelist"),
        {
            "action": "reject_selected",
            "_selected_action": [alice_app.pk, bob_app.pk],
            "confirm": "yes",
            "reason": "Out of scope.",
        },
    )
    assert response.status_code == 302
    assert fresh(alice_app).status == Status.REJECTED
    assert fresh(bob_app).status == Status.SUBMITTED
    assert fresh(bob_app).claimed_by_id == olga.pk


def test_admin_reassign_release_and_filters(
    reviewer_client, reviewer, olga, alice_app, bob, make_submitted
):
    bob_app = make_submitted(bob)
    changelist = reverse("admin:access_application_changelist")
    reviewer_client.post(reverse("admin:access_application_claim", args=[alice_app.pk]))

    def listed(**params) -> list[int]:
        return [a.pk for a in reviewer_client.get(changelist, params).context["cl"].result_list]

    assert listed(claim="mine") == [alice_app.pk]
    assert listed(claim="unclaimed") == [bob_app.pk]

    response = reviewer_client.post(
        reverse("admin:access_application_reassign_claim", args=[alice_app.pk]), {"to": olga.pk}
    )
    assert response.status_code == 302
    assert fresh(alice_app).claimed_by_id == olga.pk
    assert listed(claim="mine") == []
    assert listed(claim="others") == [alice_app.pk]

    response = reviewer_client.post(
        reverse("admin:access_application_reassign_claim", args=[bob_app.pk]), {"to": "nobody"}
    )
    assert claims.REASSIGN_TARGET in messages_of(response)
    assert fresh(bob_app).claimed_by_id is None

    reviewer_client.post(reverse("admin:access_application_claim", args=[bob_app.pk]))
    reviewer_client.post(reverse("admin:access_application_release_claim", args=[bob_app.pk]))
    assert fresh(bob_app).claimed_by_id is None
    assert (
        reviewer_client.get(
            reverse("admin:access_application_claim", args=[bob_app.pk])
        ).status_code
        == 405
    )  # claims change state: POST only


def test_queue_sorts_by_age_and_shows_it(reviewer_client, alice, bob, make_submitted):
    older, newer = make_submitted(alice), make_submitted(bob)
    Application.objects.filter(pk=newer.pk).update(submitted_at=timezone.now() - timedelta(hours=2))
    Application.objects.filter(pk=older.pk).update(
        submitted_at=timezone.now() - timedelta(days=3, hours=4)
    )
    response = reviewer_client.get(reverse("admin:access_application_changelist"))
    assert [a.pk for a in response.context["cl"].result_list] == [older.pk, newer.pk]
    content = response.content.decode()
    assert "3 d 4 h" in content and "2 h 0 min" in content


def test_change_page_keys_and_next_unclaimed(
    reviewer_client, reviewer, olga, alice, bob, charlie, make_submitted
):
    first, second, third = make_submitted(alice), make_submitted(bob), make_submitted(charlie)
    claims.claim_take(application=second, reviewer=olga)
    response = reviewer_client.get(change_url(first))
    content = response.content.decode()
    approve = reverse("admin:access_application_approve", args=[first.pk])
    assert f'href="{approve}" class="decision-link" accesskey="a" data-review-key="a"' in content
    assert 'accesskey="r" data-review-key="r"' in content
    assert 'data-review-key="n"' in content and 'data-review-key="c"' in content
    assert "<kbd>a</kbd> approve, <kbd>r</kbd> reject" in content
    # Claim forms sit before the change form: a form nested in it would submit the outer one.
    claim_form = content.index(reverse("admin:access_application_claim", args=[first.pk]))
    assert claim_form < content.index('id="application_form"')
    # The script is a static file of this origin with the request's nonce: no inline script.
    nonce = response.wsgi_request.csp_nonce
    assert f'review_keys.js" nonce="{nonce}" defer></script>' in content
    assert "script-src 'self'" in response["Content-Security-Policy"]
    script = finders.find("access/review_keys.js")
    with open(script, encoding="utf-8") as served:
        assert "data-review-key" in served.read()

    next_url = reverse("admin:access_application_next_unclaimed")
    response = reviewer_client.get(next_url, {"after": first.pk})
    assert response["Location"] == change_url(third)  # the second is olga's
    assert reviewer_client.get(next_url)["Location"] == change_url(first)


# --- the API -------------------------------------------------------------------


def api_client(user) -> APIClient:
    client = APIClient(HTTP_USER_AGENT="pytest-api/1.0")
    client.default_format = "json"
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token(user)}")
    return client


def claim_url(name: str, pk: int) -> str:
    return reverse(f"api:{name}", args=[pk])


def test_api_claim_release_and_queue_rows(alice_app, alice, reviewer, olga):
    rita, other = api_client(reviewer), api_client(olga)
    response = rita.post(claim_url("review-claim", alice_app.pk), {})
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["application_id"] == alice_app.pk
    assert body["claimed_by"] == reviewer.email
    assert body["expires_at"] > body["claimed_at"]

    refused = other.post(claim_url("review-claim", alice_app.pk), {})
    assert refused.status_code == 409
    assert refused.json()["code"] == "claimed_by_other"
    assert other.post(claim_url("review-release-claim", alice_app.pk)).status_code == 409
    assert fresh(alice_app).claimed_by_id == reviewer.pk

    row = other.get(reverse("api:review-queue")).json()["results"][0]
    assert row["claimed_by"] == reviewer.email and row["claimed_at"] == body["claimed_at"]
    assert row["age_seconds"] >= 0

    bad = other.post(claim_url("review-claim", alice_app.pk), {"takeover": "maybe"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid"
    assert fresh(alice_app).claimed_by_id == reviewer.pk
    taken = other.post(claim_url("review-claim", alice_app.pk), {"takeover": True})
    assert taken.json()["claimed_by"] == olga.email

    released = other.post(claim_url("review-release-claim", alice_app.pk))
    assert released.status_code == 200 and released.json()["claimed_by"] is None
    assert fresh(alice_app).claimed_by_id is None
    assert rita.post(claim_url("review-claim", 999999), {}).status_code == 404
    assert api_client(alice).post(claim_url("review-claim", alice_app.pk), {}).status_code == 403


def test_api_claim_operations_are_documented(db):
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    operations = {
        spec["operationId"]: (path, spec)
        for path, item in schema["paths"].items()
        for spec in item.values()
        if isinstance(spec, dict) and "operationId" in spec
    }
    for name in ("review_application_claim", "review_application_release_claim"):
        path, spec = operations[name]
        assert path.endswith("/claim/") or path.endswith("/release-claim/")
        for code in ("401", "403", "404", "409", "429"):
            ref = spec["responses"][code]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorEnvelope")
    queue_row = schema["components"]["schemas"]["ReviewQueueRow"]["properties"]
    assert {"claimed_by", "claimed_at", "age_seconds"} <= set(queue_row)


def test_helpers_for_the_decision_services(alice_app, reviewer, olga):
    """refuse_if_held and end_claim: what access.services.reviews calls on a locked row."""
    claims.claim_take(application=alice_app, reviewer=reviewer)
    locked = fresh(alice_app)
    claims.refuse_if_held(locked, reviewer)
    with pytest.raises(errors.IllegalTransition) as refused:
        claims.refuse_if_held(locked, olga)
    assert refused.value.code == "claimed_by_other"
    assert claims.end_claim(locked) == ["claimed_by", "claimed_at"]
    locked.save(update_fields=claims.end_claim(locked))
    assert fresh(alice_app).claimed_by_id is None
    claims.refuse_if_held(fresh(alice_app), olga)


def test_a_claim_binds_every_door_to_a_decision(alice_app, reviewer, olga, releases):
    """The decision services refuse another reviewer's live claim, so the API (and any
    command calling them) cannot decide under someone's hands; the holder can, and the
    decision ends the claim."""
    from access.services import reviews

    claims.claim_take(application=alice_app, reviewer=reviewer)
    other = api_client(olga)
    for name, body in (
        ("review-approve", {"releases": ["llama-7b"]}),
        ("review-reject", {"reason": "No."}),
        ("review-request-info", {"question": "Which lab?"}),
    ):
        refused = other.post(reverse(f"api:{name}", args=[alice_app.pk]), body)
        assert refused.status_code == 409, (name, refused.json())
        assert refused.json()["code"] == "claimed_by_other"
    with pytest.raises(errors.IllegalTransition):
        reviews.application_reject(application=fresh(alice_app), reviewer=olga, reason="No.")
    assert fresh(alice_app).status == Application.Status.SUBMITTED
    assert not Grant.objects.exists()

    approved = api_client(reviewer).post(
        reverse("api:review-approve", args=[alice_app.pk]), {"releases": ["llama-7b"]}
    )
    assert approved.status_code == 200, approved.json()
    after = fresh(alice_app)
    assert after.status == Application.Status.APPROVED and after.claimed_by_id is None
