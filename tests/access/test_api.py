"""The REST API: researcher and reviewer flows, scoping, permissions and bad input."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core import mail
from django.core.cache import cache
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from access import errors
from access.models import Application, ApplicationEvent, Grant, LicenseAcceptance, Notification
from access.serializers import UNKNOWN_FIELD
from access.services import throttles
from access.services.throttles import SUBMIT_RATE_LIMITED
from tests.conftest import FIELDS
from tests.tokens import api_token

pytestmark = pytest.mark.django_db
Status = Application.Status


@pytest.fixture(autouse=True)
def _fresh_throttles():
    cache.clear()  # throttle counters live in the cache and would leak between tests


@pytest.fixture
def api():
    def make(user=None) -> APIClient:
        client = APIClient(HTTP_USER_AGENT="pytest-api/1.0")
        client.default_format = "json"
        if user is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token(user)}")
        return client

    return make


def url(name: str, pk: int | None = None) -> str:
    return reverse(f"api:{name}", args=[] if pk is None else [pk])


def create_draft(client, **extra):
    body = {**FIELDS, "releases": ["llama-7b", "llama-13b"], **extra}
    return client.post(url("application-list"), body)


RESEARCHER_ACTIONS = [
    ("get", "application-detail", None),
    ("patch", "application-detail", {"affiliation": "Elsewhere"}),
    ("post", "application-submit", {"accept_license": True}),
    ("post", "application-withdraw", None),
    ("post", "application-answer", {"answer": "Because."}),
]
REVIEW_ACTIONS = [
    ("get", "review-detail", None),
    ("post", "review-approve", {"releases": ["llama-7b"]}),
    ("post", "review-reject", {"reason": "No."}),
    ("post", "review-request-info", {"question": "Why?"}),
    ("post", "review-revoke", {"reason": "Misuse."}),
]
BAD_SLUG = 'Enter a valid "slug" consisting of letters, numbers, underscores or hyphens.'
BAD_ORCID = "This ORCID iD's check digit is wrong; copy it from your ORCID record."
TOO_LONG_USE = "Keep the intended research use under 4000 characters (it has 4001)."
UNKNOWN_RELEASE = (
    "Unknown release(s): gpt-5. Choose from: llama-7b, llama-13b, llama-33b, llama-65b."
)
NO_PK = {"release-list", "license-current", "license-accept", "application-list", "review-queue"}


def refusal(detail: str, code: str) -> dict:
    """The API's error envelope for an error that is not about input fields."""
    return {"detail": detail, "code": code, "errors": {}}


def invalid(errors: dict[str, list[str]]) -> dict:
    """The envelope of a 400 on input fields."""
    problems = " ".join(f"{field}: {' '.join(messages)}" for field, messages in errors.items())
    return {"detail": f"Invalid input. {problems}", "code": "invalid", "errors": errors}


def call(client, method: str, name: str, pk: int, body=None):
    return getattr(client, method)(url(name, pk), body)


def post(client, name: str, pk: int, body=None):
    return call(client, "post", name, pk, body)


# --- Researcher flow -----------------------------------------------------------


def test_researcher_creates_edits_and_submits(
    api, alice, reviewer, license_v1, releases, django_capture_on_commit_callbacks
):
    client = api(alice)
    created = create_draft(client, affiliation="")
    assert created.status_code == 201, created.json()
    pk = created.json()["id"]
    assert created.json()["status"] == "draft"
    assert [r["slug"] for r in created.json()["releases"]] == ["llama-7b", "llama-13b"]

    patched = client.patch(url("application-detail", pk), {"affiliation": "Uni"})
    assert patched.status_code == 200
    assert Application.objects.get(pk=pk).affiliation == "Uni"

    assert client.get(url("license-current")).json()["accepted"] is False
    with django_capture_on_commit_callbacks(execute=True):
        submitted = post(client, "application-submit", pk, {"accept_license": True})
    assert submitted.status_code == 200, submitted.json()
    assert submitted.json()["status"] == "submitted"
    assert submitted.json()["license_version"] == "1"
    acceptance = LicenseAcceptance.objects.get(user=alice, license_version=license_v1)
    assert (acceptance.ip_address, acceptance.user_agent) == ("127.0.0.1", "pytest-api/1.0")
    assert Notification.objects.filter(kind="application_submitted", recipient=alice.email).exists()
    sent = {m.to[0]: m.subject for m in mail.outbox}
    assert sent[alice.email] == f"[LLaMA access] Application #{pk} received"
    assert reviewer.email in sent

    detail = client.get(url("application-detail", pk)).json()
    assert [e["action"] for e in detail["events"]] == ["created", "submitted"]
    assert detail["events"][1]["by"] == "applicant"
    assert detail["events"][1]["releases"] == ["llama-13b", "llama-7b"]
    assert client.get(url("license-current")).json()["accepted"] is True
    listing = client.get(url("application-list")).json()
    assert [a["id"] for a in listing["results"]] == [pk]


def test_submit_needs_license_acceptance_and_complete_draft(api, alice, license_v1, releases):
    client = api(alice)
    pk = create_draft(client, role="").json()["id"]
    refused = post(client, "application-submit", pk, {"accept_license": False})
    assert refused.status_code == 400
    assert refused.json() == invalid({"accept_license": [errors.LICENSE_NOT_ACCEPTED]})
    incomplete = post(client, "application-submit", pk, {"accept_license": True})
    assert incomplete.status_code == 400
    assert incomplete.json()["code"] == "incomplete"
    # The acceptance is rolled back with the refused submission.
    assert not LicenseAcceptance.objects.exists()
    assert Application.objects.get(pk=pk).status == Status.DRAFT


def test_one_open_application_withdraw_and_apply_again(api, alice, releases):
    client = api(alice)
    pk = create_draft(client).json()["id"]
    second = create_draft(client)
    assert second.status_code == 409
    assert second.json() == refusal(errors.ALREADY_OPEN, "already_open")
    withdrawn = post(client, "application-withdraw", pk)
    assert withdrawn.status_code == 200
    assert withdrawn.json()["status"] == "withdrawn"
    again = post(client, "application-withdraw", pk)
    assert again.status_code == 409
    assert again.json()["code"] == "illegal_transition"
    assert create_draft(client).status_code == 201
    assert Application.objects.filter(applicant=alice).count() == 2


def test_catalogue_and_license_accept(api, alice, license_v1, releases):
    client = api(alice)
    slugs = [r["slug"] for r in client.get(url("release-list")).json()]
    assert slugs == ["llama-7b", "llama-13b", "llama-33b", "llama-65b"]
    stale = client.post(url("license-accept"), {"accept": True, "version": "0"})
    assert stale.status_code == 400
    assert stale.json() == invalid(
        {"version": ["Version 0 is not the current license (current: 1)."]}
    )
    assert client.post(url("license-accept"), {"accept": False}).status_code == 400
    assert not LicenseAcceptance.objects.exists()
    accepted = client.post(url("license-accept"), {"accept": True, "version": "1"})
    assert accepted.status_code == 200
    assert accepted.json()["version"] == "1"
    assert LicenseAcceptance.objects.filter(user=alice, license_version=license_v1).count() == 1


# --- Reviewer flow -------------------------------------------------------------


def test_approve_two_of_three_then_revoke(api, alice, reviewer, make_submitted):
    application = make_submitted(alice)
    response = post(
        api(reviewer), "review-approve", application.pk, {"releases": ["llama-7b", "llama-13b"]}
    )
    assert response.status_code == 200, response.json()
    assert response.json()["status"] == "approved"
    granted = Grant.objects.filter(user=alice).values_list("release__slug", flat=True)
    assert sorted(granted) == ["llama-13b", "llama-7b"]
    mine = api(alice).get(url("application-detail", application.pk)).json()
    assert mine["status"] == "approved"
    assert sorted(g["release"]["slug"] for g in mine["grants"]) == ["llama-13b", "llama-7b"]
    assert all(g["active"] for g in mine["grants"])
    revoked = post(api(reviewer), "review-revoke", application.pk, {"reason": "Misuse."})
    assert revoked.json()["status"] == "revoked"
    assert set(Grant.objects.values_list("revoke_reason", flat=True)) == {"Misuse."}


def test_reject_needs_a_reason_shown_to_the_applicant(
    api, alice, reviewer, make_submitted, django_capture_on_commit_callbacks
):
    application = make_submitted(alice)
    client = api(reviewer)
    missing = post(client, "review-reject", application.pk, {})
    assert missing.status_code == 400
    assert missing.json() == invalid({"reason": ["This field is required."]})
    blank = post(client, "review-reject", application.pk, {"reason": "   "})
    assert blank.json() == invalid({"reason": ["This field may not be blank."]})
    application.refresh_from_db()
    assert application.status == Status.SUBMITTED

    reason = "The intended use is commercial."
    with django_capture_on_commit_callbacks(execute=True):
        rejected = post(client, "review-reject", application.pk, {"reason": reason})
    assert rejected.status_code == 200
    assert Notification.objects.filter(kind="application_rejected", recipient=alice.email).exists()
    assert [m.to for m in mail.outbox] == [[alice.email]]
    assert reason in mail.outbox[0].body
    mine = api(alice).get(url("application-detail", application.pk)).json()
    assert mine["status"] == "rejected"
    assert mine["events"][-1] == {**mine["events"][-1], "action": "rejected", "message": reason}
    assert mine["events"][-1]["by"] == "reviewer"
    assert "actor_email" not in mine["events"][-1]


def test_request_info_answer_returns_to_submitted(api, alice, reviewer, make_submitted):
    application = make_submitted(alice)
    asked = post(api(reviewer), "review-request-info", application.pk, {"question": "Which lab?"})
    assert asked.json()["status"] == "info_requested"
    researcher = api(alice)
    mine = researcher.get(url("application-detail", application.pk)).json()
    assert mine["events"][-1]["message"] == "Which lab?"
    empty = post(researcher, "application-answer", application.pk, {"answer": ""})
    assert empty.json() == invalid({"answer": ["This field may not be blank."]})
    answered = post(researcher, "application-answer", application.pk, {"answer": "The NLP lab."})
    assert answered.status_code == 200
    assert answered.json()["status"] == "submitted"
    assert answered.json()["events"][-1]["action"] == "answered"


@pytest.mark.parametrize(
    ("who", "method", "name", "body", "status"),
    [
        ("reviewer", "post", "review-approve", {"releases": ["llama-7b"]}, Status.REJECTED),
        ("reviewer", "post", "review-request-info", {"question": "?"}, Status.INFO_REQUESTED),
        ("reviewer", "post", "review-revoke", {"reason": "x"}, Status.SUBMITTED),
        ("alice", "post", "application-answer", {"answer": "x"}, Status.SUBMITTED),
        ("alice", "post", "application-submit", {"accept_license": True}, Status.SUBMITTED),
        ("alice", "patch", "application-detail", {"role": "x"}, Status.SUBMITTED),
        ("alice", "post", "application-withdraw", None, Status.APPROVED),
    ],
)
def test_illegal_transitions_are_409(
    api, alice, reviewer, make_submitted, who, method, name, body, status
):
    application = make_submitted(alice)
    Application.objects.filter(pk=application.pk).update(status=status)
    events = ApplicationEvent.objects.count()
    response = call(
        api(reviewer if who == "reviewer" else alice), method, name, application.pk, body
    )
    assert response.status_code == 409, response.json()
    assert response.json()["code"] == "illegal_transition"
    assert Application.objects.get(pk=application.pk).status == status
    assert ApplicationEvent.objects.count() == events


def test_review_queue_oldest_first_with_status_filter(
    api, alice, bob, charlie, reviewer, make_submitted, releases
):
    first, second = make_submitted(bob), make_submitted(alice)
    draft = create_draft(api(charlie)).json()["id"]
    client = api(reviewer)
    assert client.get(url("review-detail", draft)).status_code == 404
    queue = client.get(url("review-queue")).json()
    assert [a["id"] for a in queue["results"]] == [first.pk, second.pk]
    assert queue["results"][0]["applicant_email"] == bob.email
    post(client, "review-reject", first.pk, {"reason": "No."})
    assert [a["id"] for a in client.get(url("review-queue")).json()["results"]] == [second.pk]
    rejected = client.get(url("review-queue"), {"status": "rejected"}).json()
    assert [a["id"] for a in rejected["results"]] == [first.pk]
    bad = client.get(url("review-queue"), {"status": "draft"})
    assert bad.status_code == 400
    assert bad.json() == invalid({"status": ['"draft" is not a valid choice.']})


def test_review_detail_shows_answers_and_screening_flags(api, alice, reviewer, make_submitted):
    application = make_submitted(
        alice, institutional_email="alice@gmail.com", orcid="0000-0002-1825-0097"
    )
    body = api(reviewer).get(url("review-detail", application.pk)).json()
    assert body["orcid"] == "0000-0002-1825-0097"
    assert body["intended_use"] == FIELDS["intended_use"]
    assert body["country"] == "GB"
    assert body["applicant_email"] == alice.email
    assert "free_mail" in [flag["code"] for flag in body["screening_flags"]]
    assert body["events"][-1]["actor_email"] == alice.email


def test_reviewer_cannot_approve_own_application(api, reviewer, make_submitted):
    application = make_submitted(reviewer)
    response = post(api(reviewer), "review-approve", application.pk, {"releases": ["llama-7b"]})
    assert response.status_code == 403
    assert response.json() == refusal(errors.OWN_APPLICATION, "own_application")
    assert not Grant.objects.exists()


# --- Scoping and permissions ---------------------------------------------------


@pytest.mark.parametrize(("method", "name", "body"), RESEARCHER_ACTIONS)
def test_charlie_cannot_reach_alices_application(
    api, alice, charlie, reviewer, make_submitted, method, name, body
):
    application = make_submitted(alice)
    post(api(reviewer), "review-request-info", application.pk, {"question": "?"})
    before = (ApplicationEvent.objects.count(), Application.objects.get().status)
    response = call(api(charlie), method, name, application.pk, body)
    assert response.status_code == 404
    assert response.json() == refusal("No such application.", "not_found")
    assert (ApplicationEvent.objects.count(), Application.objects.get().status) == before
    assert api(charlie).get(url("application-list")).json()["results"] == []


@pytest.mark.parametrize(
    ("method", "name", "body"), [("get", "review-queue", None), *REVIEW_ACTIONS]
)
def test_non_reviewers_get_403_on_review_endpoints(
    api, alice, charlie, make_submitted, method, name, body
):
    application = make_submitted(alice)
    charlie.is_staff = True  # staff but not in the Reviewers group
    charlie.save()
    for user in (alice, charlie):
        path = url(name) if name == "review-queue" else url(name, application.pk)
        response = getattr(api(user), method)(path, body)
        assert response.status_code == 403
        assert response.json() == refusal(errors.NOT_REVIEWER, "not_reviewer")
    assert Application.objects.get().status == Status.SUBMITTED


@pytest.mark.parametrize(
    ("method", "name"),
    [("get", "license-current"), ("post", "license-accept")]
    + [("get", "application-list"), ("post", "application-list"), ("get", "review-queue")]
    + [(m, n) for m, n, _ in RESEARCHER_ACTIONS + REVIEW_ACTIONS],
)
def test_unauthenticated_requests_are_401(api, method, name):
    path = url(name) if name in NO_PK else url(name, 1)
    response = getattr(api(), method)(path, {})
    assert response.status_code == 401
    assert response.json() == refusal(
        "Authentication credentials were not provided.", "not_authenticated"
    )


# --- Schema and docs -----------------------------------------------------------


def test_schema_is_valid_openapi_3_with_all_paths(api, alice):
    response = api(alice).get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    validate_schema(schema)
    with_id = {n for _, n, _ in RESEARCHER_ACTIONS + REVIEW_ACTIONS}
    paths = {url(n) for n in NO_PK} | {url(n, 0).replace("/0/", "/{id}/") for n in with_id}
    assert paths <= set(schema["paths"])
    submit = schema["paths"]["/api/applications/{id}/submit/"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Submit"
    )


def test_docs_page(api, alice):
    assert api(alice).get("/api/docs/").status_code == 200


# --- Bad input -----------------------------------------------------------------


JSON, FORM = "application/json", "application/x-www-form-urlencoded"


TOO_LARGE = "Request body too large: the API accepts at most 262144 bytes."


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "code", "message"),
    [
        (b'{"full_name": ', JSON, 400, "parse_error", "JSON parse error - Expecting value"),
        (b'{"full_name": "\xff\xfe"}', JSON, 400, "parse_error", "JSON parse error - 'utf-8'"),
        (b'{"role": "' + b"x" * 300_000 + b'"}', JSON, 413, "body_too_large", TOO_LARGE),
        (b"[1, 2]", JSON, 400, "invalid", "Invalid data. Expected a dictionary, but got list."),
        (b"role=x", FORM, 415, "unsupported_media_type", f'Unsupported media type "{FORM}"'),
    ],
)
def test_malformed_bodies_are_4xx(api, alice, releases, raw, content_type, status, code, message):
    response = api(alice).post(url("application-list"), raw, content_type=content_type)
    assert response.status_code == status
    body = response.json()
    assert (set(body), body["code"], body["errors"]) == ({"detail", "code", "errors"}, code, {})
    assert body["detail"].startswith(message), body
    assert Application.objects.count() == 0


NOT_REQUESTED = {
    "detail": errors.RELEASES_NOT_REQUESTED.format(releases="llama-65b"),
    "code": "not_requested",
    "errors": {},
}
TOO_LONG_TEXT = "Ensure this field has no more than 5000 characters."
NOT_A_LIST = 'Expected a list of items but got type "str".'
BAD_DRAFTS = [  # (body, field, its messages)
    ({"releases": "llama-7b"}, "releases", [NOT_A_LIST]),
    ({"full_name": ["Alice"]}, "full_name", ["Not a valid string."]),
    ({"full_name": None}, "full_name", ["This field may not be null."]),
    ({"releases": ["llama-7b", "gpt-5"]}, "releases", [UNKNOWN_RELEASE]),
    ({"releases": ["llama-7b", "llama-7b"]}, "releases", ["List each release once."]),
    ({"releases": [{"slug": "x"}]}, "releases.0", [BAD_SLUG]),
    ({"orcid": "0000-0002-1825-0098"}, "orcid", [BAD_ORCID]),
    ({"country": "Atlantis"}, "country", ['"Atlantis" is not a valid choice.']),
    ({"organisation_type": "cartel"}, "organisation_type", ['"cartel" is not a valid choice.']),
    ({"institutional_email": "nope"}, "institutional_email", ["Enter a valid email address."]),
    ({"intended_use": "x" * 4001}, "intended_use", [TOO_LONG_USE]),
    ({"status": "approved"}, "status", [UNKNOWN_FIELD]),
]


@pytest.mark.parametrize(("body", "field", "messages"), BAD_DRAFTS)
def test_wrong_fields_are_400_with_field_messages(api, alice, releases, body, field, messages):
    response = api(alice).post(url("application-list"), body)
    assert response.status_code == 400
    assert response.json() == invalid({field: messages})
    assert Application.objects.count() == 0
    assert ApplicationEvent.objects.count() == 0


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("review-approve", {"releases": "llama-7b"}, {"releases": [NOT_A_LIST]}),
        ("review-approve", {"releases": []}, {"releases": ["This list may not be empty."]}),
        ("review-approve", {"releases": ["gpt-5"]}, {"releases": [UNKNOWN_RELEASE]}),
        ("review-approve", {"releases": ["llama-65b"]}, NOT_REQUESTED),
        ("review-reject", {"reason": ["a", "b"]}, {"reason": ["Not a valid string."]}),
        ("review-request-info", {"question": "x" * 5001}, {"question": [TOO_LONG_TEXT]}),
        ("review-reject", {"reason": "ok", "notify": False}, {"notify": [UNKNOWN_FIELD]}),
    ],
)
def test_reviewer_bad_input_is_400_and_changes_nothing(
    api, alice, reviewer, make_submitted, name, body, expected
):
    application = make_submitted(alice)
    response = api(reviewer).post(url(name, application.pk), body)
    assert response.status_code == 400
    assert response.json() == (expected if "code" in expected else invalid(expected))
    assert Application.objects.get().status == Status.SUBMITTED
    assert not Grant.objects.exists()


def test_out_of_range_id_is_404(api, alice):
    assert api(alice).get(url("application-detail", 2**70)).status_code == 404


def test_no_license_in_effect(api, alice, releases):
    client = api(alice)
    current = client.get(url("license-current"))
    assert current.json() == refusal(errors.NO_CURRENT_LICENSE, "not_found")
    pk = create_draft(client).json()["id"]
    response = post(client, "application-submit", pk, {"accept_license": True})
    assert response.json() == refusal(errors.NO_CURRENT_LICENSE, "no_license")
    assert Application.objects.get().status == Status.DRAFT


def submit_fresh_draft(client):
    """Withdraw what is open, then create and submit a new draft."""
    for application in client.get(url("application-list")).json()["results"]:
        if application["status"] == Status.SUBMITTED:
            post(client, "application-withdraw", application["id"])
    pk = create_draft(client).json()["id"]
    return post(client, "application-submit", pk, {"accept_license": True})


@override_settings(PORTAL_SUBMIT_RATE="2/h")
def test_failed_submissions_do_not_use_the_allowance_and_successes_do(
    api, alice, license_v1, releases
):
    client = api(alice)
    pk = create_draft(client).json()["id"]
    submit = url("application-submit", pk)
    failed = [
        client.post(submit, {}).status_code,
        client.post(submit, {"accept_license": False}).status_code,
        client.post(submit, {"accept_license": True, "extra": 1}).status_code,
        client.post(url("application-submit", pk + 1000), {"accept_license": True}).status_code,
    ]
    assert failed == [400, 400, 400, 404]
    assert client.post(submit, {"accept_license": True}).status_code == 200
    # Submitting it again is a 409, and costs nothing either.
    again = [client.post(submit, {"accept_license": True}).status_code for _ in range(3)]
    assert again == [409, 409, 409]
    assert submit_fresh_draft(client).status_code == 200

    refused = submit_fresh_draft(client)
    assert refused.status_code == 429
    assert refused.json() == refusal(SUBMIT_RATE_LIMITED, "throttled")
    assert 3590 <= int(refused["Retry-After"]) <= 3600
    assert Application.objects.filter(applicant=alice, status=Status.DRAFT).count() == 1
    assert ApplicationEvent.objects.filter(actor=alice, action="submitted").count() == 2


@override_settings(PORTAL_SUBMIT_RATE="1/h")
def test_the_submit_allowance_is_a_sliding_window(api, alice, license_v1, releases, monkeypatch):
    client = api(alice)
    assert submit_fresh_draft(client).status_code == 200
    assert submit_fresh_draft(client).status_code == 429
    later = timezone.now() + timedelta(hours=1, seconds=1)
    monkeypatch.setattr(throttles, "_now", lambda: later)
    pk = Application.objects.get(applicant=alice, status=Status.DRAFT).pk
    assert post(client, "application-submit", pk, {"accept_license": True}).status_code == 200


@override_settings(PORTAL_SUBMIT_RATE="1/h")
def test_the_submit_allowance_is_shared_by_the_page_and_the_api(
    api, client, alice, license_v1, releases
):
    client.force_login(alice)
    page = client.post(
        reverse("access:apply"),
        {
            **FIELDS,
            "requested_releases": [releases["llama-7b"].pk],
            "accept_license": "on",
            "action": "submit",
        },
    )
    assert page.status_code == 302
    assert submit_fresh_draft(api(alice)).status_code == 429


def test_a_draft_without_a_country_serialises(api, alice, releases):
    """Found by schemathesis: an empty country used to crash the JSON renderer."""
    client = api(alice)
    response = client.post(url("application-list"), {"institutional_email": ""})
    assert response.status_code == 201, response.content
    assert response.json()["institutional_email"] == ""
    assert client.get(url("application-list")).status_code == 200
