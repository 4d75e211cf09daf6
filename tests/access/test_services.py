"""The status machine: every legal transition and the refusal of every illegal one."""

from __future__ import annotations

import pytest
from allauth.account.models import EmailAddress

from access import errors
from access.models import Application, ApplicationEvent, Grant
from access.services import applications as apps
from access.services import reviews
from tests.conftest import FIELDS
from tests.factories import ApplicationFactory, accept_license

S = Application.Status
pytestmark = pytest.mark.django_db


def test_draft_is_saved_incomplete_and_submitted_when_complete(alice, license_v1, releases):
    draft = apps.application_save_draft(applicant=alice, fields={"full_name": "Alice"}, releases=[])
    assert draft.status == S.DRAFT
    with pytest.raises(errors.InvalidInput) as exc:
        apps.application_submit(
            application=draft, applicant=alice, license_acceptance=accept_license(alice, license_v1)
        )
    assert exc.value.code == "incomplete" and "affiliation" in str(exc.value)
    apps.application_save_draft(
        applicant=alice, fields=FIELDS, releases=[releases["llama-7b"]], application=draft
    )
    acceptance = alice.license_acceptances.get()  # recorded by the first attempt
    submitted = apps.application_submit(
        application=draft, applicant=alice, license_acceptance=acceptance
    )
    assert submitted.status == S.SUBMITTED and submitted.submitted_at is not None
    assert submitted.license_acceptance.license_version == license_v1
    assert list(submitted.events.values_list("action", flat=True)) == ["created", "submitted"]


def test_submit_requires_releases_license_and_verified_email(alice, license_v1, releases):
    draft = apps.application_save_draft(applicant=alice, fields=FIELDS, releases=[])
    with pytest.raises(errors.InvalidInput, match=errors.NO_RELEASES):
        apps.application_submit(application=draft, applicant=alice, license_acceptance=None)
    draft.requested_releases.set([releases["llama-7b"]])
    with pytest.raises(errors.InvalidInput, match=errors.LICENSE_NOT_ACCEPTED):
        apps.application_submit(application=draft, applicant=alice, license_acceptance=None)
    EmailAddress.objects.filter(user=alice).update(verified=False)
    with pytest.raises(errors.NotAllowed, match=errors.EMAIL_NOT_VERIFIED):
        apps.application_submit(
            application=draft, applicant=alice, license_acceptance=accept_license(alice, license_v1)
        )
    assert Application.objects.get(pk=draft.pk).status == S.DRAFT


def test_submit_with_superseded_license_acceptance_is_refused(alice, license_v1, releases):
    from tests.factories import LicenseVersionFactory

    draft = apps.application_save_draft(
        applicant=alice, fields=FIELDS, releases=[releases["llama-7b"]]
    )
    old = accept_license(alice, license_v1)
    LicenseVersionFactory(version="2")
    with pytest.raises(errors.InvalidInput, match="license changed"):
        apps.application_submit(application=draft, applicant=alice, license_acceptance=old)


def test_invalid_fields_are_refused_with_field_names_and_nothing_saved(alice, releases):
    with pytest.raises(errors.InvalidInput) as exc:
        apps.application_save_draft(
            applicant=alice,
            fields={
                **FIELDS,
                "institutional_email": "not-an-email",
                "orcid": "0000-0002-1825-0098",
                "country": "ZZ",
            },
        )
    message = str(exc.value)
    assert "institutional_email" in message and "orcid" in message and "country" in message
    assert not Application.objects.exists()


def test_one_open_application_per_researcher(alice, make_submitted):
    make_submitted(alice)
    with pytest.raises(errors.ServiceError, match="already have an open application"):
        apps.application_save_draft(applicant=alice, fields=FIELDS)
    assert Application.objects.filter(applicant=alice).count() == 1


def test_apply_again_for_more_releases_after_approval(alice, reviewer, make_submitted, releases):
    first = make_submitted(alice, slugs=("llama-7b",))
    reviews.application_approve(
        application=first, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    # Asking again for a release already granted is refused...
    second = apps.application_save_draft(
        applicant=alice, fields=FIELDS, releases=[releases["llama-7b"]]
    )
    with pytest.raises(errors.InvalidInput, match="already have access to: llama-7b"):
        apps.application_submit(
            application=second, applicant=alice, license_acceptance=alice.license_acceptances.get()
        )
    # ...asking for a new one works.
    second.requested_releases.set([releases["llama-65b"]])
    apps.application_submit(
        application=second, applicant=alice, license_acceptance=alice.license_acceptances.get()
    )
    assert Application.objects.get(pk=second.pk).status == S.SUBMITTED


def test_approve_a_subset_creates_grants_only_for_it(alice, reviewer, make_submitted, releases):
    application = make_submitted(alice)
    grants = reviews.application_approve(
        application=application,
        reviewer=reviewer,
        releases=[releases["llama-7b"], releases["llama-13b"]],
    )
    assert sorted(g.release.slug for g in grants) == ["llama-13b", "llama-7b"]
    assert Grant.objects.filter(user=alice).count() == 2
    grant = Grant.objects.get(user=alice, release__slug="llama-7b")
    assert (
        grant.granted_by == reviewer
        and grant.license_version.version == "1"
        and grant.revoked_at is None
    )
    event = application.events.get(action="approved")
    assert event.actor == reviewer and event.releases == ["llama-13b", "llama-7b"]
    assert event.from_status == S.SUBMITTED and event.to_status == S.APPROVED


def test_approve_refuses_releases_not_requested_and_empty_choice(
    alice, reviewer, make_submitted, releases
):
    application = make_submitted(alice, slugs=("llama-7b",))
    with pytest.raises(errors.InvalidInput, match="not requested: llama-65b"):
        reviews.application_approve(
            application=application, reviewer=reviewer, releases=[releases["llama-65b"]]
        )
    with pytest.raises(errors.InvalidInput, match=errors.NO_RELEASES):
        reviews.application_approve(application=application, reviewer=reviewer, releases=[])
    assert not Grant.objects.exists()


def test_reject_requires_reason_and_records_it(alice, reviewer, make_submitted):
    application = make_submitted(alice)
    with pytest.raises(errors.InvalidInput, match=errors.REASON_REQUIRED):
        reviews.application_reject(application=application, reviewer=reviewer, reason="  ")
    reviews.application_reject(
        application=application, reviewer=reviewer, reason="No institutional affiliation."
    )
    application.refresh_from_db()
    assert application.status == S.REJECTED
    assert application.events.get(action="rejected").message == "No institutional affiliation."


def test_question_and_answer_cycle(alice, reviewer, make_submitted):
    application = make_submitted(alice)
    reviews.application_request_info(
        application=application, reviewer=reviewer, question="Which lab?"
    )
    assert Application.objects.get(pk=application.pk).status == S.INFO_REQUESTED
    with pytest.raises(errors.InvalidInput, match=errors.ANSWER_REQUIRED):
        apps.application_answer(application=application, applicant=alice, answer="")
    apps.application_answer(application=application, applicant=alice, answer="The NLP group.")
    application.refresh_from_db()
    assert application.status == S.SUBMITTED
    assert [e.action for e in application.events.all()][-2:] == ["info_requested", "answered"]


def test_revoke_approval_revokes_every_grant(alice, reviewer, make_submitted, releases):
    application = make_submitted(alice)
    reviews.application_approve(
        application=application,
        reviewer=reviewer,
        releases=[releases["llama-7b"], releases["llama-13b"]],
    )
    with pytest.raises(errors.InvalidInput, match=errors.REASON_REQUIRED):
        reviews.application_revoke(application=application, reviewer=reviewer, reason="")
    reviews.application_revoke(application=application, reviewer=reviewer, reason="License breach.")
    assert Application.objects.get(pk=application.pk).status == S.REVOKED
    assert not Grant.objects.filter(user=alice, revoked_at__isnull=True).exists()
    assert set(Grant.objects.values_list("revoke_reason", flat=True)) == {"License breach."}


def test_grant_revoke_single_release(alice, reviewer, make_submitted, releases):
    application = make_submitted(alice)
    grants = reviews.application_approve(
        application=application,
        reviewer=reviewer,
        releases=[releases["llama-7b"], releases["llama-13b"]],
    )
    reviews.grant_revoke(grant=grants[0], reviewer=reviewer, reason="Shared the weights.")
    assert Grant.objects.filter(user=alice, revoked_at__isnull=True).count() == 1
    with pytest.raises(errors.IllegalTransition):
        reviews.grant_revoke(grant=grants[0], reviewer=reviewer, reason="again")


LEGAL = {
    S.DRAFT: {"submit", "withdraw"},
    S.SUBMITTED: {"approve", "reject", "request_info", "withdraw"},
    S.INFO_REQUESTED: {"approve", "reject", "answer", "withdraw"},
    S.APPROVED: {"revoke"},
    S.REJECTED: set(),
    S.WITHDRAWN: set(),
    S.REVOKED: set(),
}
ACTIONS = ["submit", "withdraw", "approve", "reject", "request_info", "answer", "revoke"]


def _run(action, application, alice, reviewer, releases, acceptance):
    calls = {
        "submit": lambda: apps.application_submit(
            application=application, applicant=alice, license_acceptance=acceptance
        ),
        "withdraw": lambda: apps.application_withdraw(application=application, applicant=alice),
        "answer": lambda: apps.application_answer(
            application=application, applicant=alice, answer="Answer."
        ),
        "approve": lambda: reviews.application_approve(
            application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
        ),
        "reject": lambda: reviews.application_reject(
            application=application, reviewer=reviewer, reason="Reason."
        ),
        "request_info": lambda: reviews.application_request_info(
            application=application, reviewer=reviewer, question="Q?"
        ),
        "revoke": lambda: reviews.application_revoke(
            application=application, reviewer=reviewer, reason="Reason."
        ),
    }
    return calls[action]()


@pytest.mark.parametrize("status", list(LEGAL))
@pytest.mark.parametrize("action", ACTIONS)
def test_transition_matrix(status, action, alice, reviewer, license_v1, releases):
    acceptance = accept_license(alice, license_v1)
    application = ApplicationFactory(applicant=alice, status=status, license_acceptance=acceptance)
    application.requested_releases.set([releases["llama-7b"]])
    if status == S.APPROVED:
        Grant.objects.create(
            user=alice,
            release=releases["llama-7b"],
            application=application,
            license_version=license_v1,
            granted_by=reviewer,
        )
    events_before = ApplicationEvent.objects.count()
    if action in LEGAL[status]:
        _run(action, application, alice, reviewer, releases, acceptance)
        application.refresh_from_db()
        assert application.status != status
        assert ApplicationEvent.objects.count() == events_before + 1
    else:
        with pytest.raises(errors.IllegalTransition):
            _run(action, application, alice, reviewer, releases, acceptance)
        application.refresh_from_db()
        assert application.status == status
        assert ApplicationEvent.objects.count() == events_before


def test_reviewer_cannot_decide_own_application(reviewer, make_submitted, releases):
    application = make_submitted(reviewer)
    for call in (
        lambda: reviews.application_approve(
            application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
        ),
        lambda: reviews.application_reject(application=application, reviewer=reviewer, reason="x"),
        lambda: reviews.application_request_info(
            application=application, reviewer=reviewer, question="x"
        ),
    ):
        with pytest.raises(errors.NotAllowed, match=errors.OWN_APPLICATION):
            call()
    assert Application.objects.get(pk=application.pk).status == S.SUBMITTED


def test_non_reviewers_cannot_decide(alice, bob, make_submitted, releases):
    application = make_submitted(alice)
    bob.is_staff = True
    bob.save()
    with pytest.raises(errors.NotAllowed, match=errors.NOT_REVIEWER):
        reviews.application_approve(
            application=application, reviewer=bob, releases=[releases["llama-7b"]]
        )


def test_researcher_cannot_act_on_anothers_application(alice, charlie, make_submitted):
    application = make_submitted(alice)
    with pytest.raises(errors.NotAllowed):
        apps.application_withdraw(application=application, applicant=charlie)
    with pytest.raises(errors.NotAllowed):
        apps.application_save_draft(
            applicant=charlie, fields={"full_name": "x"}, application=application
        )


def test_events_are_append_only(alice, make_submitted):
    event = make_submitted(alice).events.first()
    event.message = "rewritten"
    with pytest.raises(ValueError, match="append-only"):
        event.save()
    with pytest.raises(ValueError, match="append-only"):
        event.delete()
