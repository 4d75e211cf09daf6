"""The reviewer's admin, driven as a reviewer would: password, then TOTP code, then the queue."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.core import mail
from django.core.cache import cache
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from access import errors
from access.models import Application, ApplicationEvent, Grant, LicenseVersion, Notification
from access.services.applications import application_save_draft
from access.services.reviewers import reviewers_group_ensure
from access.services.reviews import application_approve
from portal.admin_site import NEEDS_TOTP
from tests.factories import UserFactory
from tests.twofactor import activate_totp, login_with_2fa, password_login

Status = Application.Status
CHANGELIST = "admin:access_application_changelist"


def reviewers_group():
    return reviewers_group_ensure()


def messages_of(response) -> list[tuple[str, str]]:
    return [(m.level_tag, m.message) for m in get_messages(response.wsgi_request)]


def changelist(client: Client, **params):
    return client.get(reverse(CHANGELIST), params)


def listed(response) -> list[int]:
    return [application.pk for application in response.context["cl"].result_list]


def decision_url(application: Application, decision: str) -> str:
    return reverse(f"admin:access_application_{decision}", args=[application.pk])


def change_url(application: Application) -> str:
    return reverse("admin:access_application_change", args=[application.pk])


def run_action(client: Client, action: str, applications, **form):
    data = {"action": action, "_selected_action": [a.pk for a in applications], **form}
    return client.post(reverse(CHANGELIST), data)


@pytest.fixture(autouse=True)
def _fresh_cache():
    # allauth remembers used TOTP codes and rate limits in the cache.
    cache.clear()


@pytest.fixture
def staff_client(db, password):
    """Staff who may look at the queue but is not a reviewer: no decide permission."""
    sam = UserFactory(username="sam", email="sam@portal.example.org", is_staff=True)
    sam.user_permissions.add(Permission.objects.get(codename="view_application"))
    return login_with_2fa(Client(), sam, password)


@pytest.fixture
def alice_app(alice, make_submitted):
    return make_submitted(alice)


# --- who gets in -----------------------------------------------------------------


def test_staff_without_totp_is_sent_to_set_it_up(client, reviewer, password):
    reviewers_group()
    response = password_login(client, reviewer, password)
    assert response.status_code == 302  # signed in with a password only
    response = changelist(client)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    response = client.get(response["Location"])
    assert response.status_code == 302
    assert response["Location"] == reverse("mfa_activate_totp")
    assert ("warning", NEEDS_TOTP) in messages_of(response)
    assert client.get(reverse("admin:index")).status_code == 302


def test_staff_with_totp_who_did_not_give_the_code_cannot_open_the_admin(
    client, reviewer, password, alice_app
):
    reviewers_group()
    activate_totp(reviewer)
    response = password_login(client, reviewer, password)
    assert response["Location"] == reverse("mfa_authenticate")
    assert "_auth_user_id" not in client.session
    response = changelist(client)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    response = client.post(decision_url(alice_app, "reject"), {"reason": "No."})
    assert response.status_code == 302
    alice_app.refresh_from_db()
    assert alice_app.status == Status.SUBMITTED


def test_a_session_without_the_second_factor_is_signed_out_of_the_admin(client, reviewer):
    reviewers_group()
    activate_totp(reviewer)
    client.force_login(reviewer)  # a password-only session, never passed the code
    response = client.get(reverse("admin:index"))
    response = client.get(response["Location"])
    assert response["Location"].startswith(reverse("account_login"))
    assert "_auth_user_id" not in client.session


def test_charlie_who_is_not_staff_gets_no_admin(client, charlie, password, alice_app):
    response = password_login(client, charlie, password)
    assert client.session["_auth_user_id"] == str(charlie.pk)
    response = changelist(client)
    assert response.status_code == 302
    response = client.get(response["Location"])
    assert response["Location"] == reverse("home")
    response = client.post(decision_url(alice_app, "approve"), {"releases": []})
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    response = run_action(client, "reject_selected", [alice_app], confirm="yes", reason="No.")
    assert response.status_code == 302
    alice_app.refresh_from_db()
    assert alice_app.status == Status.SUBMITTED
    assert not ApplicationEvent.objects.filter(actor=charlie).exists()


# --- the queue -------------------------------------------------------------------


def test_queue_lists_submitted_oldest_first_and_hides_drafts(
    reviewer_client, alice, bob, charlie, make_submitted, releases
):
    first = make_submitted(bob)
    second = make_submitted(alice)
    Application.objects.filter(pk=first.pk).update(
        submitted_at=timezone.now() - timezone.timedelta(days=3)
    )
    Application.objects.filter(pk=second.pk).update(
        submitted_at=timezone.now() - timezone.timedelta(days=1)
    )
    draft = application_save_draft(
        applicant=charlie, fields={"full_name": "Charlie Draft"}, releases=[releases["llama-7b"]]
    )

    response = changelist(reviewer_client)
    assert response.status_code == 200
    assert listed(response) == [first.pk, second.pk]
    content = response.content.decode()
    assert "Bob Researcher" in content and "Alice Researcher" in content
    assert "Charlie Draft" not in content
    assert "LLaMA 7B, LLaMA 13B, LLaMA 33B" in content
    assert reviewer_client.get(change_url(draft)).status_code == 302  # no such object in the queue


def test_queue_filters_and_search(reviewer_client, alice, bob, charlie, make_submitted, releases):
    a = make_submitted(
        alice, slugs=("llama-7b",), country="GB", affiliation="University of Example"
    )
    b = make_submitted(
        bob,
        slugs=("llama-65b",),
        country="FR",
        organisation_type="industry_lab",
        affiliation="Lab Paris",
    )
    c = make_submitted(charlie, slugs=("llama-7b", "llama-65b"), country="FR")
    application_approve(
        application=c,
        reviewer=UserFactory(username="olga", is_superuser=True, is_staff=True),
        releases=[releases["llama-7b"]],
    )

    assert listed(changelist(reviewer_client, status__exact="approved")) == [c.pk]
    assert listed(changelist(reviewer_client, status__exact="submitted")) == [a.pk, b.pk]
    assert listed(changelist(reviewer_client, organisation_type__exact="industry_lab")) == [b.pk]
    assert listed(changelist(reviewer_client, country="FR")) == [b.pk, c.pk]
    assert listed(
        changelist(reviewer_client, requested_releases__id__exact=releases["llama-65b"].pk)
    ) == [b.pk, c.pk]
    assert listed(changelist(reviewer_client, q="Lab Paris")) == [b.pk]
    assert listed(changelist(reviewer_client, q="alice@uni.example.edu")) == [a.pk]
    assert listed(changelist(reviewer_client, q="Charlie Researcher")) == [c.pk]
    country_choices = changelist(reviewer_client).content.decode()
    assert "France" in country_choices and "Germany" not in country_choices


@override_settings(PORTAL_RESTRICTED_COUNTRIES=["KP"])
def test_change_page_shows_what_the_applicant_wrote_and_the_flags(
    reviewer_client, alice, make_submitted
):
    application = make_submitted(
        alice,
        institutional_email="alice.researcher@gmail.com",
        country="KP",
        intended_use="Measuring memorisation of <script>rare</script> strings in LLaMA.",
    )
    response = reviewer_client.get(change_url(application))
    assert response.status_code == 200
    content = response.content.decode()
    assert "Measuring memorisation of &lt;script&gt;rare&lt;/script&gt; strings" in content
    assert "alice.researcher@gmail.com" in content
    assert "University of Example" in content
    codes = {flag.code for flag in response.context["screening_flags"]}
    assert {"free_mail", "restricted_country"} <= codes
    assert "Institutional email uses a free-mail domain (gmail.com)." in content
    assert "is on the restricted list." in content
    assert 'name="_save"' not in content  # nothing the applicant wrote is editable
    assert decision_url(application, "approve") in content
    assert decision_url(application, "reject") in content
    assert decision_url(application, "request_info") in content
    assert decision_url(application, "revoke") not in content
    queue = changelist(reviewer_client).content.decode()
    assert "free mail" in queue and "restricted country" in queue


def test_reviewer_cannot_edit_add_or_delete_applications(reviewer_client, alice_app):
    response = reviewer_client.post(
        change_url(alice_app), {"full_name": "Mallory", "_save": "Save"}
    )
    assert response.status_code == 403
    assert reviewer_client.get(reverse("admin:access_application_add")).status_code == 403
    assert (
        reviewer_client.get(
            reverse("admin:access_application_delete", args=[alice_app.pk])
        ).status_code
        == 403
    )
    alice_app.refresh_from_db()
    assert alice_app.full_name == "Alice Researcher"


# --- single decisions ------------------------------------------------------------


def test_approve_two_of_three_requested_releases(
    reviewer_client, reviewer, alice, alice_app, releases, django_capture_on_commit_callbacks
):
    response = reviewer_client.get(decision_url(alice_app, "approve"))
    assert response.status_code == 200
    form = response.context["form"]
    requested = {releases[s].pk for s in ("llama-7b", "llama-13b", "llama-33b")}
    assert set(form.fields["releases"].initial) == requested  # all checked by default
    assert {r.pk for r in form.fields["releases"].queryset} == requested
    assert response.content.decode().count('name="releases"') == 3
    assert "csrfmiddlewaretoken" in response.content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        response = reviewer_client.post(
            decision_url(alice_app, "approve"),
            {"releases": [releases["llama-7b"].pk, releases["llama-13b"].pk], "note": "Welcome."},
        )
    assert response.status_code == 302
    assert response["Location"] == change_url(alice_app)
    assert ("success", f"Approved {alice_app}.") in messages_of(response)

    alice_app.refresh_from_db()
    assert alice_app.status == Status.APPROVED
    grants = Grant.objects.filter(application=alice_app)
    assert sorted(g.release.slug for g in grants) == ["llama-13b", "llama-7b"]
    assert {(g.user_id, g.granted_by_id, g.revoked_at) for g in grants} == {
        (alice.pk, reviewer.pk, None)
    }
    event = alice_app.events.get(action=ApplicationEvent.Action.APPROVED)
    assert event.actor == reviewer
    assert event.message == "Welcome."
    assert event.releases == ["llama-13b", "llama-7b"]
    notification = Notification.objects.get(kind="application_approved")
    assert notification.recipient == alice.email
    assert notification.context["not_granted"] == ["LLaMA 33B"]
    email, *link_emails = mail.outbox
    # Each grant also gets its own download-link email (weights app).
    assert sorted(m.subject for m in link_emails) == [
        "[LLaMA access] Your download link for LLaMA 13B",
        "[LLaMA access] Your download link for LLaMA 7B",
    ]
    assert email.to == [alice.email]
    assert f"Application #{alice_app.pk} approved" in email.subject
    assert "is approved for: LLaMA 13B, LLaMA 7B." in email.body
    assert "Not granted this time: LLaMA 33B." in email.body
    assert "Welcome." in email.body

    page = reviewer_client.get(change_url(alice_app)).content.decode()
    assert "Welcome." in page and "LLaMA 13B" in page
    assert decision_url(alice_app, "revoke") in page


def test_approve_with_nothing_checked_is_refused(reviewer_client, alice_app):
    response = reviewer_client.post(decision_url(alice_app, "approve"), {"note": ""})
    assert response.status_code == 200
    assert ("error", errors.NO_RELEASES) in messages_of(response)
    alice_app.refresh_from_db()
    assert alice_app.status == Status.SUBMITTED
    assert not Grant.objects.exists()


def test_reject_without_a_reason_changes_nothing(reviewer_client, alice_app):
    events_before = alice_app.events.count()
    notifications_before = Notification.objects.count()
    response = reviewer_client.post(decision_url(alice_app, "reject"), {"reason": "   "})
    assert response.status_code == 200  # the form again, to type a reason
    assert ("error", errors.REASON_REQUIRED) in messages_of(response)
    assert errors.REASON_REQUIRED in response.content.decode()
    alice_app.refresh_from_db()
    assert alice_app.status == Status.SUBMITTED
    assert alice_app.events.count() == events_before
    assert Notification.objects.count() == notifications_before


def test_decision_pages_need_the_csrf_token(reviewer_client, alice_app):
    reviewer_client.handler.enforce_csrf_checks = True
    page = reviewer_client.get(decision_url(alice_app, "reject"))
    response = reviewer_client.post(decision_url(alice_app, "reject"), {"reason": "No."})
    assert response.status_code == 403
    alice_app.refresh_from_db()
    assert alice_app.status == Status.SUBMITTED
    token = str(page.context["csrf_token"])
    response = reviewer_client.post(
        decision_url(alice_app, "reject"), {"reason": "No.", "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 302
    alice_app.refresh_from_db()
    assert alice_app.status == Status.REJECTED


def test_reject_with_a_reason(
    reviewer_client, reviewer, alice, alice_app, django_capture_on_commit_callbacks
):
    reason = "The intended use is commercial, which the license does not allow."
    with django_capture_on_commit_callbacks(execute=True):
        response = reviewer_client.post(decision_url(alice_app, "reject"), {"reason": reason})
    assert response.status_code == 302
    assert ("success", f"Rejected {alice_app}.") in messages_of(response)
    alice_app.refresh_from_db()
    assert alice_app.status == Status.REJECTED
    event = alice_app.events.get(action=ApplicationEvent.Action.REJECTED)
    assert (event.actor, event.message, event.from_status) == (reviewer, reason, Status.SUBMITTED)
    notification = Notification.objects.get(kind="application_rejected")
    assert (notification.recipient, notification.context["reason"]) == (alice.email, reason)
    (email,) = mail.outbox
    assert email.to == [alice.email]
    assert f"Reason: {reason}" in email.body
    assert not Grant.objects.exists()


def test_request_more_information(
    reviewer_client, reviewer, alice, alice_app, django_capture_on_commit_callbacks
):
    question = "Which benchmark will you evaluate on?"
    with django_capture_on_commit_callbacks(execute=True):
        response = reviewer_client.post(
            decision_url(alice_app, "request_info"), {"reason": question}
        )
    assert response.status_code == 302
    alice_app.refresh_from_db()
    assert alice_app.status == Status.INFO_REQUESTED
    event = alice_app.events.get(action=ApplicationEvent.Action.INFO_REQUESTED)
    assert (event.actor, event.message) == (reviewer, question)
    assert (
        Notification.objects.get(kind="application_info_requested").context["question"] == question
    )
    (email,) = mail.outbox
    assert email.to == [alice.email]
    assert question in email.body


def test_request_info_without_a_question_is_refused(reviewer_client, alice_app):
    response = reviewer_client.post(decision_url(alice_app, "request_info"), {"reason": ""})
    assert response.status_code == 200
    assert ("error", errors.QUESTION_REQUIRED) in messages_of(response)
    alice_app.refresh_from_db()
    assert alice_app.status == Status.SUBMITTED


def test_revoke_an_approval(reviewer_client, reviewer, alice_app, releases):
    application_approve(
        application=alice_app,
        reviewer=reviewer,
        releases=[releases["llama-7b"], releases["llama-13b"]],
    )
    response = reviewer_client.post(
        decision_url(alice_app, "revoke"), {"reason": "License breach reported."}
    )
    assert response.status_code == 302
    assert ("success", f"Revoked the approval of {alice_app}.") in messages_of(response)
    alice_app.refresh_from_db()
    assert alice_app.status == Status.REVOKED
    grants = Grant.objects.filter(application=alice_app)
    assert grants.count() == 2
    assert all(g.revoked_at is not None and g.revoked_by == reviewer for g in grants)
    assert (
        alice_app.events.get(action=ApplicationEvent.Action.REVOKED).message
        == "License breach reported."
    )


def test_a_decision_in_the_wrong_status_is_reported(reviewer_client, alice_app):
    response = reviewer_client.post(decision_url(alice_app, "revoke"), {"reason": "Because."})
    assert response.status_code == 302
    assert response["Location"] == change_url(alice_app)
    assert ("error", errors.TRANSITION.format(action="revoke", status="submitted")) in messages_of(
        response
    )
    alice_app.refresh_from_db()
    assert alice_app.status == Status.SUBMITTED


def test_reviewer_cannot_decide_their_own_application(
    reviewer_client, reviewer, make_submitted, releases
):
    own = make_submitted(reviewer)
    response = reviewer_client.post(
        decision_url(own, "approve"), {"releases": [releases["llama-7b"].pk]}
    )
    assert response.status_code == 302
    assert ("error", errors.OWN_APPLICATION) in messages_of(response)
    response = reviewer_client.post(decision_url(own, "reject"), {"reason": "Mine."})
    assert ("error", errors.OWN_APPLICATION) in messages_of(response)
    own.refresh_from_db()
    assert own.status == Status.SUBMITTED
    assert not Grant.objects.exists()


def test_staff_without_decide_permission_cannot_decide(staff_client, alice_app, releases):
    response = changelist(staff_client)
    assert response.status_code == 200
    assert listed(response) == [alice_app.pk]
    assert response.context["action_form"] is None  # no decision actions offered
    assert (
        decision_url(alice_app, "approve")
        not in staff_client.get(change_url(alice_app)).content.decode()
    )

    assert staff_client.get(decision_url(alice_app, "approve")).status_code == 403
    response = staff_client.post(
        decision_url(alice_app, "approve"), {"releases": [releases["llama-7b"].pk]}
    )
    assert response.status_code == 403
    assert (
        staff_client.post(decision_url(alice_app, "reject"), {"reason": "No."}).status_code == 403
    )
    response = run_action(staff_client, "approve_selected", [alice_app], confirm="yes")
    assert not [m for m in messages_of(response) if m[0] == "success"]
    alice_app.refresh_from_db()
    assert alice_app.status == Status.SUBMITTED
    assert not Grant.objects.exists()


# --- bulk decisions --------------------------------------------------------------


def test_bulk_approve_grants_everything_requested_and_reports_the_failing_row(
    reviewer_client, reviewer, alice, bob, make_submitted
):
    a = make_submitted(alice, slugs=("llama-7b", "llama-13b"))
    b = make_submitted(bob, slugs=("llama-65b",))
    own = make_submitted(reviewer, slugs=("llama-7b",))

    page = run_action(reviewer_client, "approve_selected", [a, b, own])
    assert page.status_code == 200  # the confirmation page
    assert [obj.pk for obj, _ in page.context["rows"]] == [a.pk, b.pk, own.pk]
    assert not Grant.objects.exists()

    response = run_action(reviewer_client, "approve_selected", [a, b, own], confirm="yes", note="")
    assert response.status_code == 302
    found = messages_of(response)
    assert ("error", f"{own}: {errors.OWN_APPLICATION}") in found
    assert ("success", f"Approved 2 applications: #{a.pk}, #{b.pk}.") in found
    for application in (a, b, own):
        application.refresh_from_db()
    assert (a.status, b.status, own.status) == (Status.APPROVED, Status.APPROVED, Status.SUBMITTED)
    assert sorted(Grant.objects.filter(user=alice).values_list("release__slug", flat=True)) == [
        "llama-13b",
        "llama-7b",
    ]
    assert list(Grant.objects.filter(user=bob).values_list("release__slug", flat=True)) == [
        "llama-65b"
    ]
    assert not Grant.objects.filter(user=reviewer).exists()


def test_bulk_reject_with_one_reason_and_a_row_in_the_wrong_status(
    reviewer_client, reviewer, alice, bob, make_submitted, releases
):
    a = make_submitted(alice)
    b = make_submitted(bob)
    application_approve(application=b, reviewer=reviewer, releases=[releases["llama-7b"]])

    response = run_action(reviewer_client, "reject_selected", [a], confirm="yes", reason="")
    assert response.status_code == 200  # refused only for the missing reason: the form again
    assert ("error", f"{a}: {errors.REASON_REQUIRED}") in messages_of(response)
    a.refresh_from_db()
    assert a.status == Status.SUBMITTED

    reason = "Outside the research scope of this release."
    response = run_action(reviewer_client, "reject_selected", [a, b], confirm="yes", reason=reason)
    assert response.status_code == 302
    found = messages_of(response)
    assert (
        "error",
        f"{b}: {errors.TRANSITION.format(action='reject', status='approved')}",
    ) in found
    assert ("success", f"Rejected 1 application: #{a.pk}.") in found
    a.refresh_from_db()
    b.refresh_from_db()
    assert (a.status, b.status) == (Status.REJECTED, Status.APPROVED)
    assert a.events.get(action=ApplicationEvent.Action.REJECTED).message == reason
    assert Grant.objects.filter(application=b, revoked_at__isnull=True).count() == 1


def test_revoke_selected_grants(reviewer_client, reviewer, alice_app, releases):
    application_approve(
        application=alice_app,
        reviewer=reviewer,
        releases=[releases["llama-7b"], releases["llama-13b"]],
    )
    seven, thirteen = (Grant.objects.get(release=releases[s]) for s in ("llama-7b", "llama-13b"))
    url = reverse("admin:access_grant_changelist")
    data = {"action": "revoke_selected_grants", "_selected_action": [seven.pk]}
    assert reviewer_client.post(url, data).status_code == 200
    response = reviewer_client.post(
        url, {**data, "confirm": "yes", "reason": "Shared the weights."}
    )
    assert response.status_code == 302
    seven.refresh_from_db()
    thirteen.refresh_from_db()
    assert (seven.revoke_reason, seven.revoked_by) == ("Shared the weights.", reviewer)
    assert thirteen.revoked_at is None
    assert Notification.objects.get(kind="grant_revoked").context["release"] == "LLaMA 7B"
    active = reviewer_client.get(url, {"revoked": "no"})
    assert [g.pk for g in active.context["cl"].result_list] == [thirteen.pk]


# --- the records around decisions -----------------------------------------------


def test_timeline_and_outbox_are_read_only(reviewer_client, alice_app):
    event = alice_app.events.first()
    response = reviewer_client.get(reverse("admin:access_applicationevent_change", args=[event.pk]))
    assert response.status_code == 200
    assert 'name="_save"' not in response.content.decode()
    assert (
        reviewer_client.post(
            reverse("admin:access_applicationevent_change", args=[event.pk]), {}
        ).status_code
        == 403
    )
    assert reviewer_client.get(reverse("admin:access_applicationevent_add")).status_code == 403
    unsent = reviewer_client.get(reverse("admin:access_notification_changelist"), {"sent": "no"})
    assert unsent.status_code == 200
    assert {n.kind for n in unsent.context["cl"].result_list} >= {"application_submitted"}
    Notification.objects.update(sent_at=timezone.now())
    assert (
        not reviewer_client.get(reverse("admin:access_notification_changelist"), {"sent": "no"})
        .context["cl"]
        .result_list
    )


def test_license_versions_are_published_through_the_service_and_never_edited(password, license_v1):
    admin_user = UserFactory(
        username="olga", email="olga@portal.example.org", is_staff=True, is_superuser=True
    )
    client = login_with_2fa(Client(), admin_user, password)
    assert client.get(reverse("admin:access_licenseversion_add")).status_code == 200
    effective = {"effective_from_0": "2030-01-01", "effective_from_1": "00:00:00"}
    response = client.post(
        reverse("admin:access_licenseversion_add"),
        {"name": "LLaMA license", "version": "2", "text": "Version two.", **effective},
    )
    assert response.status_code == 302
    published = LicenseVersion.objects.get(version="2")
    assert published.text_sha256 == LicenseVersion.digest("Version two.")
    duplicate = client.post(
        reverse("admin:access_licenseversion_add"),
        {"name": "Again", "version": "2", "text": "Other text.", **effective},
    )
    assert duplicate.status_code == 200
    assert duplicate.context["adminform"].form.errors["version"]
    assert LicenseVersion.objects.count() == 2
    response = client.post(
        reverse("admin:access_licenseversion_change", args=[license_v1.pk]), {"text": "Changed."}
    )
    assert response.status_code == 403
    license_v1.refresh_from_db()
    assert license_v1.text.startswith("LLaMA research license v1.")


def test_reviewers_cannot_publish_licenses(reviewer_client):
    assert reviewer_client.get(reverse("admin:access_licenseversion_add")).status_code == 403
    assert reviewer_client.get(reverse("admin:access_licenseversion_changelist")).status_code == 200
