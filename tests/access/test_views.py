"""The researcher's pages: apply, follow, answer, withdraw, re-accept the license, API token.

Charlie has no business with Alice's application: every page of it is a 404 to him.
"""

from __future__ import annotations

import html

import pytest
from django.core import mail
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from access import errors
from access.models import ApiToken, Application, ApplicationEvent, LicenseAcceptance
from access.services import reviews
from access.services.throttles import SUBMIT_RATE_LIMITED
from portal.form_encoding import NOT_UTF8
from tests.conftest import FIELDS
from tests.factories import LicenseVersionFactory

S = Application.Status
APPLY = reverse("access:apply")
UA = "Mozilla/5.0 (X11; Linux x86_64) TestBrowser/1.0"
pytestmark = pytest.mark.django_db


def text(response) -> str:
    return html.unescape(response.content.decode())


def form_data(releases, slugs=("llama-7b", "llama-13b"), *, action="submit", **overrides):
    data = {
        **FIELDS,
        "requested_releases": [releases[s].pk for s in slugs],
        "accept_license": "on",
        "action": action,
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def detail_url(application) -> str:
    return reverse("access:application_detail", args=[application.pk])


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def charlie_client(charlie):
    client = Client()
    client.force_login(charlie)
    return client


# The journey --------------------------------------------------------------------------------


def test_apply_page_shows_the_form_and_the_license(alice_client, license_v1, releases):
    response = alice_client.get(APPLY)
    assert response.status_code == 200
    page = text(response)
    assert "LLaMA research license v1. Noncommercial use only." in page
    assert license_v1.text_sha256[:10] in page
    for name in ("full_name", "institutional_email", "orcid", "intended_use", "accept_license"):
        assert f'name="{name}"' in page
    for release in releases.values():
        assert release.name in page
    assert "csrfmiddlewaretoken" in page


def test_save_draft_with_partial_data_keeps_it_and_shows_it_again(
    alice_client, alice, license_v1, releases
):
    response = alice_client.post(
        APPLY,
        {
            "full_name": "Alice R.",
            "requested_releases": [releases["llama-7b"].pk],
            "action": "save",
        },
    )
    assert response.status_code == 302 and response.url == APPLY
    draft = Application.objects.get(applicant=alice)
    assert draft.status == S.DRAFT and draft.full_name == "Alice R."
    assert list(draft.requested_releases.values_list("slug", flat=True)) == ["llama-7b"]
    assert not LicenseAcceptance.objects.exists()

    page = text(alice_client.get(APPLY))
    assert "Draft saved. Submit it when it is complete." in page
    assert 'value="Alice R."' in page
    assert f'value="{releases["llama-7b"].pk}" id="id_requested_releases_0" checked' in page

    # Saving again updates the same draft rather than creating another.
    alice_client.post(APPLY, {"full_name": "Alice Researcher", "action": "save"})
    assert Application.objects.get().full_name == "Alice Researcher"


def test_submit_without_accepting_the_license_is_refused_and_keeps_the_draft(
    alice_client, alice, license_v1, releases
):
    response = alice_client.post(APPLY, form_data(releases, accept_license=None))
    assert response.status_code == 200
    assert response.context["form"].errors == {"accept_license": [errors.LICENSE_NOT_ACCEPTED]}
    assert errors.LICENSE_NOT_ACCEPTED in text(response)
    draft = Application.objects.get(applicant=alice)
    assert draft.status == S.DRAFT and draft.affiliation == FIELDS["affiliation"]
    assert not LicenseAcceptance.objects.exists()
    assert not mail.outbox


def test_submit_of_an_incomplete_draft_names_the_missing_fields(
    alice_client, alice, license_v1, releases
):
    response = alice_client.post(APPLY, form_data(releases, affiliation="", role=""))
    assert response.status_code == 200
    page = text(response)
    assert "Your draft is saved, but it could not be submitted:" in page
    assert "Complete these fields before submitting: affiliation, role or position." in page
    assert Application.objects.get(applicant=alice).status == S.DRAFT
    assert not LicenseAcceptance.objects.exists()  # rolled back with the refused submit


def test_submit_without_releases_says_so(alice_client, alice, license_v1, releases):
    response = alice_client.post(APPLY, form_data(releases, slugs=()))
    assert errors.NO_RELEASES in text(response)
    assert Application.objects.get(applicant=alice).status == S.DRAFT


def test_submit_records_the_acceptance_and_sends_emails(
    alice_client, alice, reviewer, license_v1, releases, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_client.post(
            APPLY, form_data(releases), HTTP_USER_AGENT=UA, REMOTE_ADDR="203.0.113.7"
        )
    application = Application.objects.get(applicant=alice)
    assert response.status_code == 302 and response.url == detail_url(application)
    assert application.status == S.SUBMITTED and application.submitted_at is not None
    acceptance = LicenseAcceptance.objects.get(user=alice)
    assert acceptance.license_version == license_v1
    assert acceptance.ip_address == "203.0.113.7" and acceptance.user_agent == UA
    assert application.license_acceptance == acceptance

    by_recipient = {m.to[0]: m for m in mail.outbox}
    assert set(by_recipient) == {alice.email, reviewer.email}
    assert by_recipient[alice.email].subject.endswith(f"Application #{application.pk} received")
    assert "LLaMA 7B, LLaMA 13B" in by_recipient[alice.email].body
    assert "Alice Researcher" in by_recipient[reviewer.email].subject

    page = text(alice_client.get(response.url))
    assert "Application submitted. We emailed you a copy." in page
    assert 'status-submitted">Submitted</span>' in page
    assert "Releases requested: LLaMA 7B, LLaMA 13B" in page

    # With the application under review, /apply/ leads back to its status page.
    response = alice_client.get(APPLY)
    assert response.status_code == 302 and response.url == detail_url(application)


def test_status_page_shows_the_timeline_and_the_answer_goes_through_the_page(
    alice_client, alice, reviewer, make_submitted, django_capture_on_commit_callbacks
):
    application = make_submitted(alice)
    reviews.application_request_info(
        application=application, reviewer=reviewer, question="Which lab do you work in?"
    )
    page = text(alice_client.get(detail_url(application)))
    assert "More information requested" in page
    assert "Question: Which lab do you work in?" in page
    assert 'name="answer"' in page

    with django_capture_on_commit_callbacks(execute=True):
        response = alice_client.post(
            reverse("access:application_answer", args=[application.pk]),
            {"answer": "The calibration group, with Prof. Example."},
        )
    assert response.status_code == 302 and response.url == detail_url(application)
    application.refresh_from_db()
    assert application.status == S.SUBMITTED
    assert [m.to for m in mail.outbox] == [[reviewer.email]]
    assert "The calibration group" in mail.outbox[0].body

    reviews.application_reject(
        application=application, reviewer=reviewer, reason="Commercial use is not covered."
    )
    page = text(alice_client.get(detail_url(application)))
    timeline = page[page.index("Timeline") :]
    positions = [
        timeline.index(s)
        for s in (
            "Submitted",
            "Question: Which lab do you work in?",
            "Your answer: The calibration group, with Prof. Example.",
            "Rejected",
            "Reason: Commercial use is not covered.",
        )
    ]
    assert positions == sorted(positions)
    assert "Withdraw application" not in page
    assert 'name="answer"' not in page


def test_an_empty_answer_is_refused_with_a_message(alice_client, alice, reviewer, make_submitted):
    application = make_submitted(alice)
    reviews.application_request_info(application=application, reviewer=reviewer, question="Why?")
    response = alice_client.post(
        reverse("access:application_answer", args=[application.pk]), {"answer": "   "}, follow=True
    )
    assert "Answer: This field is required." in text(response)
    application.refresh_from_db()
    assert application.status == S.INFO_REQUESTED
    assert not application.events.filter(action="answered").exists()


def test_answering_when_no_question_is_pending_is_refused(alice_client, alice, make_submitted):
    application = make_submitted(alice)
    response = alice_client.post(
        reverse("access:application_answer", args=[application.pk]), {"answer": "Hi"}, follow=True
    )
    assert "Cannot answer an application that is submitted." in text(response)
    assert not application.events.filter(action="answered").exists()


def test_the_timeline_escapes_what_people_wrote(alice_client, alice, reviewer, make_submitted):
    application = make_submitted(alice)
    reviews.application_request_info(
        application=application, reviewer=reviewer, question="<b>Lab?</b>"
    )
    alice_client.post(
        reverse("access:application_answer", args=[application.pk]),
        {"answer": "<script>alert(1)</script>"},
    )
    raw = alice_client.get(detail_url(application)).content.decode()
    assert "<script>alert(1)</script>" not in raw and "<b>Lab?</b>" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw


def test_approved_grants_show_on_the_status_page(alice_client, alice, reviewer, make_submitted):
    application = make_submitted(alice)
    reviews.application_approve(
        application=application,
        reviewer=reviewer,
        releases=list(application.requested_releases.filter(slug__in=["llama-7b", "llama-13b"])),
        note="Welcome.",
    )
    page = text(alice_client.get(detail_url(application)))
    assert "Granted: llama-13b, llama-7b" in page
    assert "LLaMA 7B: active" in page and "LLaMA 13B: active" in page
    assert "LLaMA 33B: active" not in page


def test_withdrawing_through_the_page(
    alice_client, alice, reviewer, make_submitted, django_capture_on_commit_callbacks
):
    application = make_submitted(alice)
    assert "Withdraw application" in text(alice_client.get(detail_url(application)))
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_client.post(reverse("access:application_withdraw", args=[application.pk]))
    assert response.status_code == 302 and response.url == detail_url(application)
    application.refresh_from_db()
    assert application.status == S.WITHDRAWN
    assert [m.to for m in mail.outbox] == [[alice.email]]
    page = text(alice_client.get(detail_url(application)))
    assert "Application withdrawn." in page and "Withdraw application" not in page

    # A second withdrawal is refused with a message, not an error page.
    response = alice_client.post(
        reverse("access:application_withdraw", args=[application.pk]), follow=True
    )
    assert response.status_code == 200
    assert "Cannot withdraw an application that is withdrawn." in text(response)


def test_withdraw_is_post_only(alice_client, alice, make_submitted):
    application = make_submitted(alice)
    response = alice_client.get(reverse("access:application_withdraw", args=[application.pk]))
    assert response.status_code == 405
    assert Application.objects.get(pk=application.pk).status == S.SUBMITTED


def test_discarding_a_draft(alice_client, alice, license_v1, releases):
    alice_client.post(APPLY, {"full_name": "Alice", "action": "save"})
    draft = Application.objects.get(applicant=alice)
    assert "Discard draft" in text(alice_client.get(APPLY))
    alice_client.post(reverse("access:application_withdraw", args=[draft.pk]))
    assert Application.objects.get(pk=draft.pk).status == S.WITHDRAWN
    assert text(alice_client.get(APPLY)).count('value="Alice"') == 0  # a fresh form


def test_applying_again_for_more_releases_after_a_decision(
    alice_client, alice, reviewer, make_submitted, releases
):
    first = make_submitted(alice, slugs=("llama-7b",))
    reviews.application_approve(
        application=first, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    assert "Apply for more releases" in text(alice_client.get(reverse("access:application_list")))

    # Asking again for what she already holds is refused by name.
    response = alice_client.post(APPLY, form_data(releases, slugs=("llama-7b", "llama-65b")))
    assert "You already have access to: llama-7b." in text(response)
    second = Application.objects.exclude(pk=first.pk).get(applicant=alice)
    assert second.status == S.DRAFT

    response = alice_client.post(APPLY, form_data(releases, slugs=("llama-65b",)))
    second.refresh_from_db()
    assert response.status_code == 302 and response.url == detail_url(second)
    assert second.status == S.SUBMITTED
    assert list(second.requested_releases.values_list("slug", flat=True)) == ["llama-65b"]
    assert Application.objects.get(pk=first.pk).status == S.APPROVED

    listing = text(alice_client.get(reverse("access:application_list")))
    assert f"#{first.pk}" in listing and f"#{second.pk}" in listing
    assert "LLaMA 7B: active since" in listing


def test_a_new_license_version_must_be_accepted_on_its_page(alice_client, alice, make_submitted):
    make_submitted(alice)
    v2 = LicenseVersionFactory(
        version="2",
        text="LLaMA research license v2. Still noncommercial.",
        effective_from=timezone.now(),
    )
    url = reverse("access:license_accept")
    page = text(alice_client.get(url))
    assert "LLaMA research license v2. Still noncommercial." in page
    assert "The license changed or you have not accepted it yet." in page

    response = alice_client.post(url, {})
    assert "This field is required." in text(response)
    assert not LicenseAcceptance.objects.filter(license_version=v2).exists()

    response = alice_client.post(
        url, {"accept": "on"}, HTTP_USER_AGENT=UA, REMOTE_ADDR="198.51.100.4"
    )
    assert response.status_code == 302 and response.url == reverse("access:application_list")
    acceptance = LicenseAcceptance.objects.get(user=alice, license_version=v2)
    assert acceptance.ip_address == "198.51.100.4" and acceptance.user_agent == UA
    page = text(alice_client.get(url))
    assert "Nothing more to do." in page

    # Accepting again keeps the first record.
    alice_client.post(url, {"accept": "on"}, REMOTE_ADDR="192.0.2.1")
    assert LicenseAcceptance.objects.get(user=alice, license_version=v2).ip_address == (
        "198.51.100.4"
    )


def test_license_accept_follows_only_local_next_urls(alice_client, alice, license_v1):
    url = reverse("access:license_accept")
    response = alice_client.post(url + "?next=/applications/", {"accept": "on"})
    assert response.url == "/applications/"
    LicenseVersionFactory(version="2", effective_from=timezone.now())
    response = alice_client.post(url + "?next=https://evil.example.com/", {"accept": "on"})
    assert response.url == reverse("access:application_list")


# Scoping ------------------------------------------------------------------------------------


def test_charlie_gets_404_on_every_page_of_alices_application_and_changes_nothing(
    charlie_client, alice, reviewer, make_submitted, django_capture_on_commit_callbacks
):
    application = make_submitted(alice)
    reviews.application_request_info(application=application, reviewer=reviewer, question="Lab?")
    events = ApplicationEvent.objects.count()
    mail.outbox.clear()

    with django_capture_on_commit_callbacks(execute=True):
        assert charlie_client.get(detail_url(application)).status_code == 404
        for name, data in (
            ("access:application_withdraw", {}),
            ("access:application_answer", {"answer": "Charlie was here"}),
        ):
            response = charlie_client.post(reverse(name, args=[application.pk]), data)
            assert response.status_code == 404, name

    application.refresh_from_db()
    assert application.status == S.INFO_REQUESTED
    assert ApplicationEvent.objects.count() == events
    assert not mail.outbox

    for url in (reverse("access:application_list"), APPLY, "/"):
        page = text(charlie_client.get(url))
        assert detail_url(application) not in page and "Alice Researcher" not in page


def test_charlie_cannot_edit_alices_draft_through_apply(
    charlie_client, alice, license_v1, releases
):
    alice_client = Client()
    alice_client.force_login(alice)
    alice_client.post(APPLY, {"full_name": "Alice", "action": "save"})
    charlie_client.post(APPLY, {"full_name": "Charlie", "action": "save"})
    assert Application.objects.get(applicant=alice).full_name == "Alice"
    assert Application.objects.get(applicant__username="charlie").full_name == "Charlie"


@pytest.mark.parametrize(
    "name,args,method",
    [
        ("access:apply", [], "get"),
        ("access:apply", [], "post"),
        ("access:application_list", [], "get"),
        ("access:application_detail", [1], "get"),
        ("access:application_withdraw", [1], "post"),
        ("access:application_answer", [1], "post"),
        ("access:license_accept", [], "get"),
        ("access:license_accept", [], "post"),
        ("access:api_tokens", [], "get"),
        ("access:api_tokens", [], "post"),
    ],
)
def test_anonymous_users_are_sent_to_login(client, license_v1, name, args, method):
    url = reverse(name, args=args)
    response = getattr(client, method)(url)
    assert response.status_code == 302
    assert response.url == f"{reverse('account_login')}?next={url}"
    assert not Application.objects.exists() and not ApiToken.objects.exists()


def test_anonymous_users_can_read_the_license(client, license_v1):
    response = client.get(reverse("access:license"))
    assert response.status_code == 200
    assert license_v1.text in text(response)


# Bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("institutional_email", "not-an-email", "Enter a valid email address."),
        ("orcid", "0000-0002-1825-0098", "This ORCID iD's check digit is wrong"),
        ("orcid", "orcid.org/0000", "Enter an ORCID iD as 0000-0002-1825-0097."),
        ("homepage_url", "javascript:alert(1)", "Enter a valid URL."),
        ("scholar_url", "https://example.com/me", "Enter a Google Scholar profile URL"),
        ("country", "ZZ", "Select a valid choice. ZZ is not one of the available choices."),
        ("organisation_type", "cartel", "Select a valid choice. cartel is not one of"),
        ("intended_use", "x" * 4001, "Keep the intended research use under 4000 characters"),
        ("full_name", "A" * 201, "Ensure this value has at most 200 characters"),
    ],
)
@pytest.mark.parametrize("action", ["save", "submit"])
def test_invalid_fields_get_a_precise_message_and_no_row(
    alice_client, license_v1, releases, field, value, message, action
):
    response = alice_client.post(APPLY, form_data(releases, action=action, **{field: value}))
    assert response.status_code == 200
    errors_for_field = " ".join(response.context["form"].errors.get(field, []))
    assert message in errors_for_field
    assert message in text(response)
    assert not Application.objects.exists() and not LicenseAcceptance.objects.exists()


def test_unknown_release_gets_a_field_error(alice_client, license_v1, releases):
    response = alice_client.post(APPLY, form_data(releases, requested_releases=["999999"]))
    assert response.context["form"].errors["requested_releases"] == [
        "999999 is not a release in the catalogue."
    ]
    response = alice_client.post(APPLY, form_data(releases, requested_releases=["abc"]))
    assert response.status_code == 200
    assert "requested_releases" in response.context["form"].errors
    assert not Application.objects.exists()


def test_oversized_body_is_a_400_and_no_row(alice_client, license_v1, releases, settings):
    big = "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
    response = alice_client.post(APPLY, form_data(releases, publications=big))
    assert response.status_code == 400
    assert not Application.objects.exists()


def test_too_many_fields_is_a_400_and_no_row(alice_client, license_v1, releases, settings):
    data = form_data(releases)
    data["requested_releases"] = ["1"] * (settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1)
    response = alice_client.post(APPLY, data)
    assert response.status_code == 400
    assert not Application.objects.exists()


@pytest.mark.parametrize(
    "body",
    [
        b"full_name=\xff\xfe\xfd&action=save",
        b"full_name=%FF%FE&action=submit&accept_license=on",
        b"\xc3\x28\xa0\xa1=\xe2\x28\xa1&action=save",
    ],
)
def test_non_utf8_body_is_a_400_and_no_row(alice_client, license_v1, releases, body):
    response = alice_client.generic(
        "POST", APPLY, body, content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 400
    assert NOT_UTF8 in response.content.decode()
    assert not Application.objects.exists() and not LicenseAcceptance.objects.exists()


def test_utf8_text_beyond_ascii_is_kept_intact(alice_client, alice, license_v1, releases):
    name = "Zoë Ångström 王小明"
    response = alice_client.post(APPLY, {"full_name": name, "action": "save"})
    assert response.status_code == 302
    assert Application.objects.get(applicant=alice).full_name == name


def test_non_utf8_body_on_the_answer_page_is_a_400_and_no_answer(
    alice_client, alice, reviewer, make_submitted
):
    application = make_submitted(alice)
    reviews.application_request_info(application=application, reviewer=reviewer, question="?")
    response = alice_client.generic(
        "POST",
        reverse("access:application_answer", args=[application.pk]),
        b"answer=\xff\xfe",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 400
    application.refresh_from_db()
    assert application.status == S.INFO_REQUESTED
    assert not application.events.filter(action="answered").exists()


def test_csrf_is_enforced_on_apply_and_withdraw(alice, make_submitted, license_v1, releases):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    response = client.post(APPLY, form_data(releases, action="save"))
    assert response.status_code == 403
    assert not Application.objects.exists()

    application = make_submitted(alice)
    response = client.post(reverse("access:application_withdraw", args=[application.pk]))
    assert response.status_code == 403
    assert Application.objects.get(pk=application.pk).status == S.SUBMITTED

    # With the token from the page the same request goes through.
    client.get(detail_url(application))
    token = client.cookies["csrftoken"].value
    response = client.post(
        reverse("access:application_withdraw", args=[application.pk]),
        {"csrfmiddlewaretoken": token},
    )
    assert response.status_code == 302
    assert Application.objects.get(pk=application.pk).status == S.WITHDRAWN


def test_csrf_is_enforced_on_answer_license_and_token(alice, reviewer, make_submitted):
    application = make_submitted(alice)
    reviews.application_request_info(application=application, reviewer=reviewer, question="?")
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    for url, data in (
        (reverse("access:application_answer", args=[application.pk]), {"answer": "x"}),
        (reverse("access:license_accept"), {"accept": "on"}),
        (reverse("access:api_tokens"), {"name": "x", "days": "7"}),
    ):
        assert client.post(url, data).status_code == 403, url
    assert Application.objects.get(pk=application.pk).status == S.INFO_REQUESTED
    assert not ApiToken.objects.exists()


@override_settings(PORTAL_SUBMIT_RATE="2/h")
def test_the_third_submit_within_the_hour_is_refused(alice_client, alice, license_v1, releases):
    for _ in range(2):
        response = alice_client.post(APPLY, form_data(releases))
        assert response.status_code == 302
        application = Application.objects.get(applicant=alice, status=S.SUBMITTED)
        alice_client.post(reverse("access:application_withdraw", args=[application.pk]))

    response = alice_client.post(APPLY, form_data(releases))
    assert response.status_code == 200
    assert SUBMIT_RATE_LIMITED in text(response)
    assert not Application.objects.filter(status=S.SUBMITTED).exists()
    assert Application.objects.filter(applicant=alice, status=S.DRAFT).count() == 1

    # Saving a draft is not a submission and stays open.
    response = alice_client.post(APPLY, form_data(releases, action="save", role="Lecturer"))
    assert response.status_code == 302
    assert Application.objects.get(applicant=alice, status=S.DRAFT).role == "Lecturer"


@override_settings(PORTAL_SUBMIT_RATE="2/h")
def test_the_submit_limit_is_per_user(alice_client, alice, bob, license_v1, releases):
    for _ in range(2):
        assert alice_client.post(APPLY, form_data(releases)).status_code == 302
        application = Application.objects.get(applicant=alice, status=S.SUBMITTED)
        alice_client.post(reverse("access:application_withdraw", args=[application.pk]))
    assert SUBMIT_RATE_LIMITED in text(alice_client.post(APPLY, form_data(releases)))
    bob_client = Client()
    bob_client.force_login(bob)
    response = bob_client.post(APPLY, form_data(releases, institutional_email=bob.email))
    assert response.status_code == 302
    assert Application.objects.get(applicant=bob).status == S.SUBMITTED


@override_settings(PORTAL_SUBMIT_RATE="2/h")
def test_submits_refused_for_errors_do_not_use_the_allowance(
    alice_client, alice, license_v1, releases
):
    for overrides in ({"accept_license": None}, {"accept_license": None}, {"role": ""}):
        response = alice_client.post(APPLY, form_data(releases, **overrides))
        assert response.status_code == 200
        assert SUBMIT_RATE_LIMITED not in text(response)
    assert not Application.objects.filter(status=S.SUBMITTED).exists()

    for _ in range(2):
        assert alice_client.post(APPLY, form_data(releases)).status_code == 302
        application = Application.objects.get(applicant=alice, status=S.SUBMITTED)
        alice_client.post(reverse("access:application_withdraw", args=[application.pk]))
    response = alice_client.post(APPLY, form_data(releases))
    assert SUBMIT_RATE_LIMITED in text(response)
    assert not Application.objects.filter(status=S.SUBMITTED).exists()
