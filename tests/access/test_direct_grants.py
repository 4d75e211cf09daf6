"""Direct grants (no application) and revoking one grant, through the API and the admin."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core import mail
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from access import errors, policies
from access.models import Grant, GrantEvent, Notification
from access.services import direct_grants
from access.services.reviews import application_approve
from tests.factories import UserFactory, accept_license
from tests.tokens import api_token
from tests.twofactor import login_with_2fa
from weights.models import DownloadLink

pytestmark = pytest.mark.django_db

GRANTS = reverse("api:review-grant-list")
REASON = "Co-author of the calibration paper; needs the 13B weights."


def revoke_url(grant: Grant) -> str:
    return reverse("api:review-grant-revoke", args=[grant.pk])


@pytest.fixture
def api():
    def make(user=None, **token) -> APIClient:
        client = APIClient()
        client.default_format = "json"
        if user is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token(user, **token)}")
        return client

    return make


@pytest.fixture
def staff_client(db, password):
    """Staff who may look at grants but is not a reviewer."""
    sam = UserFactory(username="sam", email="sam@portal.example.org", is_staff=True)
    sam.user_permissions.add(Permission.objects.get(codename="view_grant"))
    return login_with_2fa(Client(), sam, password)


def nothing_written() -> bool:
    return not (
        Grant.objects.exists() or GrantEvent.objects.exists() or Notification.objects.exists()
    )


# --- the API: direct grants -------------------------------------------------------------


def test_api_direct_grant_emails_and_issues_a_link_after_commit(
    api, alice, reviewer, license_v1, releases, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = api(reviewer).post(
            GRANTS, {"user": "ALICE@uni.example.edu", "release": "llama-13b", "reason": REASON}
        )
        assert response.status_code == 201, response.json()
        # Nothing leaves before the commit: no link, no email.
        assert not DownloadLink.objects.exists()
        assert mail.outbox == []
    grant = Grant.objects.get()
    assert (grant.user, grant.release, grant.application) == (alice, releases["llama-13b"], None)
    assert (grant.license_version, grant.granted_by) == (license_v1, reviewer)
    event = GrantEvent.objects.get()
    assert (event.grant, event.action, event.actor, event.reason) == (
        grant,
        GrantEvent.Action.GRANTED,
        reviewer,
        REASON,
    )
    body = response.json()
    assert body["id"] == grant.pk
    assert (body["user_email"], body["release"]["slug"]) == (alice.email, "llama-13b")
    assert (body["application_id"], body["direct_reason"], body["active"]) == (None, REASON, True)
    assert (body["license_version"], body["granted_by_email"]) == ("1", reviewer.email)

    for callback in callbacks:
        callback()
    link = DownloadLink.objects.get(grant=grant)
    assert link.emailed_at is not None
    subjects = {message.subject: message for message in mail.outbox}
    assert set(subjects) == {
        "[LLaMA access] You have access to LLaMA 13B",
        "[LLaMA access] Your download link for LLaMA 13B",
    }
    assert [m.to for m in mail.outbox] == [[alice.email], [alice.email]]
    # The grantee never accepted the license: the email says so, and so does the door.
    assert (
        "accept the license (version 1)"
        in subjects["[LLaMA access] You have access to LLaMA 13B"].body
    )
    decision = policies.can_use_release(alice, releases["llama-13b"])
    assert decision.reason == policies.LICENSE_NOT_ACCEPTED
    accept_license(alice, license_v1)
    assert policies.can_use_release(alice, releases["llama-13b"]).allowed


def test_api_duplicate_active_grant_is_409_and_writes_nothing(
    api, alice, reviewer, make_submitted, releases
):
    application = make_submitted(alice)
    application_approve(application=application, reviewer=reviewer, releases=[releases["llama-7b"]])
    held = Grant.objects.get()
    before = (Grant.objects.count(), Notification.objects.count())
    response = api(reviewer).post(
        GRANTS, {"user": alice.email, "release": "llama-7b", "reason": REASON}
    )
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"{alice.email} already holds an active grant for LLaMA 7B (grant #{held.pk}).",
        "code": "already_granted",
        "errors": {},
    }
    assert (Grant.objects.count(), Notification.objects.count()) == before
    assert not GrantEvent.objects.exists()


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {"user": "nobody@example.org", "release": "llama-7b", "reason": REASON},
            "user",
            "No account has the email address or id nobody@example.org.",
        ),
        (
            {"user": "alice@uni.example.edu", "release": "gpt-5", "reason": REASON},
            "release",
            "Unknown release(s): gpt-5. Choose from: llama-7b, llama-13b, llama-33b, llama-65b.",
        ),
        (
            {"user": "alice@uni.example.edu", "release": "llama-7b", "reason": ""},
            "reason",
            "This field may not be blank.",
        ),
        (
            {"user": "alice@uni.example.edu", "release": "llama-7b", "reason": REASON, "x": 1},
            "x",
            "Unknown field. See /api/docs/ for the fields this endpoint accepts.",
        ),
    ],
)
def test_api_bad_input_is_a_precise_400(
    api, alice, reviewer, license_v1, releases, body, field, message
):
    response = api(reviewer).post(GRANTS, body)
    assert response.status_code == 400
    assert response.json()["errors"] == {field: [message]}
    assert nothing_written()


def test_api_grant_by_id_and_refusals_of_the_service(api, alice, reviewer, license_v1, releases):
    alice.is_active = False
    alice.save(update_fields=["is_active"])
    response = api(reviewer).post(
        GRANTS, {"user": str(alice.pk), "release": "llama-7b", "reason": REASON}
    )
    assert response.status_code == 400
    assert response.json()["detail"] == direct_grants.ACCOUNT_INACTIVE.format(email=alice.email)
    own = api(reviewer).post(
        GRANTS, {"user": reviewer.email, "release": "llama-7b", "reason": REASON}
    )
    assert (own.status_code, own.json()["code"]) == (403, "own_grant")
    assert nothing_written()


def test_api_without_license_in_effect_is_409(api, alice, reviewer, releases):
    response = api(reviewer).post(
        GRANTS, {"user": alice.email, "release": "llama-7b", "reason": REASON}
    )
    assert (response.status_code, response.json()["code"]) == (409, "no_license")
    assert nothing_written()


def test_api_non_reviewer_and_password_only_reviewer_are_refused(
    api, alice, bob, reviewer, license_v1, releases
):
    body = {"user": alice.email, "release": "llama-7b", "reason": REASON}
    researcher = api(bob).post(GRANTS, body)
    assert researcher.status_code == 403
    assert researcher.json() == {
        "detail": errors.NOT_REVIEWER,
        "code": "not_reviewer",
        "errors": {},
    }
    # A reviewer whose session only passed the password (staff cannot mint such tokens).
    session = APIClient()
    session.force_login(reviewer)
    for response in (session.post(GRANTS, body, format="json"), session.get(GRANTS)):
        assert response.status_code == 403
        assert response.json()["code"] == "second_factor_required"
    assert api().get(GRANTS).status_code == 401
    assert nothing_written()


def test_api_list_filters(api, alice, bob, reviewer, make_submitted, releases):
    application = make_submitted(alice)
    application_approve(
        application=application,
        reviewer=reviewer,
        releases=[releases["llama-7b"], releases["llama-13b"]],
    )
    direct = direct_grants.grant_direct(
        reviewer=reviewer, user=bob, release=releases["llama-7b"], reason=REASON
    )
    seven = Grant.objects.get(user=alice, release__slug="llama-7b")
    direct_grants.grant_revoke_one(grant=seven, reviewer=reviewer, reason="Shared it.")
    client = api(reviewer)

    def ids(**query) -> list[int]:
        response = client.get(GRANTS, query)
        assert response.status_code == 200, response.json()
        return [grant["id"] for grant in response.json()["results"]]

    thirteen = Grant.objects.get(user=alice, release__slug="llama-13b")
    assert sorted(ids()) == sorted([direct.pk, seven.pk, thirteen.pk])
    assert sorted(ids(user=alice.email)) == sorted([seven.pk, thirteen.pk])
    assert ids(user=str(bob.pk)) == [direct.pk]
    assert sorted(ids(release="llama-7b")) == sorted([direct.pk, seven.pk])
    assert ids(release="llama-7b", active="true") == [direct.pk]
    assert ids(active="false") == [seven.pk]
    bad = client.get(GRANTS, {"release": "gpt-5", "active": "maybe"})
    assert bad.status_code == 400
    assert set(bad.json()["errors"]) == {"release", "active"}


# --- the API: revoking one grant --------------------------------------------------------


def test_api_revoke_one_grant_leaves_the_others_active(
    api, alice, reviewer, make_submitted, releases, django_capture_on_commit_callbacks
):
    application = make_submitted(alice)
    with django_capture_on_commit_callbacks(execute=True):
        application_approve(
            application=application,
            reviewer=reviewer,
            releases=[releases["llama-7b"], releases["llama-13b"]],
        )
    seven, thirteen = (Grant.objects.get(release__slug=s) for s in ("llama-7b", "llama-13b"))
    assert DownloadLink.objects.filter(revoked_at__isnull=True).count() == 2
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        response = api(reviewer).post(revoke_url(seven), {"reason": "Shared the weights."})
    assert response.status_code == 200, response.json()
    assert (response.json()["active"], response.json()["revoke_reason"]) == (
        False,
        "Shared the weights.",
    )
    seven.refresh_from_db()
    thirteen.refresh_from_db()
    application.refresh_from_db()
    assert (seven.revoked_by, thirteen.revoked_at) == (reviewer, None)
    assert application.status == application.Status.APPROVED
    assert DownloadLink.objects.get(grant=seven).revoked_at is not None
    assert DownloadLink.objects.get(grant=thirteen).revoked_at is None
    event = GrantEvent.objects.get()
    assert (event.grant, event.action, event.reason) == (
        seven,
        GrantEvent.Action.REVOKED,
        "Shared the weights.",
    )
    assert [(m.to, m.subject) for m in mail.outbox] == [
        ([alice.email], "[LLaMA access] Access to LLaMA 7B revoked")
    ]
    again = api(reviewer).post(revoke_url(seven), {"reason": "Again."})
    assert (again.status_code, again.json()["code"]) == (409, "already_revoked")
    blank = api(reviewer).post(revoke_url(thirteen), {"reason": ""})
    assert blank.status_code == 400
    missing = api(reviewer).post(reverse("api:review-grant-revoke", args=[999999]), {"reason": "x"})
    assert missing.json() == {"detail": "No such grant.", "code": "not_found", "errors": {}}
    thirteen.refresh_from_db()
    assert thirteen.revoked_at is None
    assert GrantEvent.objects.count() == 1


def test_api_revoke_a_direct_grant_emails_its_holder(
    api, alice, reviewer, license_v1, releases, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        grant = direct_grants.grant_direct(
            reviewer=reviewer, user=alice, release=releases["llama-7b"], reason=REASON
        )
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        response = api(reviewer).post(revoke_url(grant), {"reason": "Project ended."})
    assert response.status_code == 200, response.json()
    assert DownloadLink.objects.get(grant=grant).revoked_at is not None
    (message,) = mail.outbox
    assert (message.to, message.subject) == (
        [alice.email],
        "[LLaMA access] Access to LLaMA 7B revoked",
    )
    assert "Reason: Project ended." in message.body
    assert list(GrantEvent.objects.values_list("action", flat=True)) == ["granted", "revoked"]


# --- the admin ----------------------------------------------------------------------------


def test_admin_grant_directly(
    reviewer_client, alice, reviewer, license_v1, releases, django_capture_on_commit_callbacks
):
    changelist = reviewer_client.get(reverse("admin:access_grant_changelist"))
    url = reverse("admin:access_grant_direct")
    assert url.encode() in changelist.content
    assert b"Grant a release directly" in changelist.content
    assert reviewer_client.get(url).status_code == 200
    form = {"account": "Alice@Uni.Example.edu", "release": releases["llama-33b"].pk}
    with django_capture_on_commit_callbacks(execute=True):
        response = reviewer_client.post(url, {**form, "reason": REASON})
    grant = Grant.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:access_grant_change", args=[grant.pk])
    assert (grant.user, grant.release.slug, grant.application) == (alice, "llama-33b", None)
    assert GrantEvent.objects.get().reason == REASON
    assert DownloadLink.objects.filter(grant=grant, emailed_at__isnull=False).count() == 1
    assert sorted(m.subject for m in mail.outbox) == [
        "[LLaMA access] You have access to LLaMA 33B",
        "[LLaMA access] Your download link for LLaMA 33B",
    ]
    page = reviewer_client.get(response["Location"])
    assert REASON.encode() in page.content  # the grant's own record on its page

    # Again: the form says why, and nothing is written.
    again = reviewer_client.post(url, {**form, "reason": REASON})
    assert again.status_code == 200
    assert again.context["form"].non_field_errors() == [
        f"{alice.email} already holds an active grant for LLaMA 33B (grant #{grant.pk})."
    ]
    assert (Grant.objects.count(), GrantEvent.objects.count()) == (1, 1)


@pytest.mark.parametrize(
    ("form", "field", "message"),
    [
        ({"account": "nobody@example.org", "reason": REASON}, "account", "No account"),
        ({"account": "not an email", "reason": REASON}, "account", "Enter a valid email"),
        ({"account": "alice@uni.example.edu", "reason": "  "}, "reason", "A reason is required"),
        ({"account": "rita@portal.example.org", "reason": REASON}, "account", "yourself"),
    ],
)
def test_admin_grant_directly_bad_input_writes_nothing(
    reviewer_client, alice, license_v1, releases, form, field, message
):
    response = reviewer_client.post(
        reverse("admin:access_grant_direct"), {**form, "release": releases["llama-7b"].pk}
    )
    assert response.status_code == 200
    assert message in " ".join(response.context["form"].errors[field])
    assert nothing_written()


def test_admin_non_reviewer_cannot_grant_or_revoke(
    staff_client, alice, reviewer, license_v1, releases
):
    grant = direct_grants.grant_direct(
        reviewer=reviewer, user=alice, release=releases["llama-7b"], reason=REASON
    )
    posted = staff_client.post(
        reverse("admin:access_grant_direct"),
        {"account": alice.email, "release": releases["llama-13b"].pk, "reason": REASON},
    )
    assert posted.status_code == 403
    revoked = staff_client.post(
        reverse("admin:access_grant_revoke", args=[grant.pk]), {"reason": "No."}
    )
    assert revoked.status_code == 403
    assert Grant.objects.get().revoked_at is None
    assert Grant.objects.count() == 1
    page = staff_client.get(reverse("admin:access_grant_change", args=[grant.pk]))
    assert b"Revoke this grant" not in page.content


def test_admin_revoke_this_grant(reviewer_client, alice, reviewer, make_submitted, releases):
    application = make_submitted(alice)
    application_approve(
        application=application,
        reviewer=reviewer,
        releases=[releases["llama-7b"], releases["llama-13b"]],
    )
    seven, thirteen = (Grant.objects.get(release__slug=s) for s in ("llama-7b", "llama-13b"))
    url = reverse("admin:access_grant_revoke", args=[seven.pk])
    page = reviewer_client.get(reverse("admin:access_grant_change", args=[seven.pk]))
    assert url.encode() in page.content
    assert reviewer_client.get(url).status_code == 200
    blank = reviewer_client.post(url, {"reason": " "})
    assert blank.status_code == 200
    assert blank.context["form"].errors["reason"] == [errors.REASON_REQUIRED]
    seven.refresh_from_db()
    assert seven.revoked_at is None

    response = reviewer_client.post(url, {"reason": "Shared the weights."})
    assert response.status_code == 302
    seven.refresh_from_db()
    thirteen.refresh_from_db()
    assert (seven.revoke_reason, seven.revoked_by, thirteen.revoked_at) == (
        "Shared the weights.",
        reviewer,
        None,
    )
    assert GrantEvent.objects.get().action == GrantEvent.Action.REVOKED
    assert Notification.objects.get(kind="grant_revoked").recipient == alice.email
    after = reviewer_client.get(reverse("admin:access_grant_change", args=[seven.pk]))
    assert url.encode() not in after.content


def test_admin_bulk_revoke_handles_a_direct_grant(
    reviewer_client, alice, reviewer, license_v1, releases
):
    grant = direct_grants.grant_direct(
        reviewer=reviewer, user=alice, release=releases["llama-7b"], reason=REASON
    )
    data = {"action": "revoke_selected_grants", "_selected_action": [grant.pk]}
    response = reviewer_client.post(
        reverse("admin:access_grant_changelist"),
        {**data, "confirm": "yes", "reason": "Project ended."},
    )
    assert response.status_code == 302
    grant.refresh_from_db()
    assert grant.revoke_reason == "Project ended."
    assert Notification.objects.filter(kind="grant_revoked", recipient=alice.email).count() == 1
