"""Approval policies: rules as data decide through the reviewer's own services.

End to end on real commits (grant, emails, download link, webhook to a real receiver),
holds and questions, manual releases untouched, every condition type, admin validation,
the dry run against reviewer decisions, overrides, and the evaluation throughput.
"""

from __future__ import annotations

import io
import json

import pytest
from django.core import mail
from django.core.management import call_command
from django.urls import reverse

from access import errors
from access.models import (
    Application,
    ApplicationEvent,
    ApprovalPolicy,
    Grant,
    PolicyRule,
    WebhookEndpoint,
)
from access.policy_conditions import Facts, conditions_compile, conditions_errors
from access.services import applications, approval_policies, reviews
from access.services.approval_policies import (
    POLICY_ACTOR_USERNAME,
    decide,
    policies_apply,
    policy_evaluate,
    policy_load,
    policy_throughput,
)
from tests.access.webhook_receiver import receiving
from tests.factories import UserFactory
from tests.twofactor import login_with_2fa
from weights.models import DownloadLink, Release

pytestmark = pytest.mark.django_db
S = Application.Status
A = ApplicationEvent.Action
VALID_ORCID = "0000-0002-1825-0097"
QUESTION = "Which research group do you work in, and who leads it?"


def policy_for(release: Release, *rules: tuple, mode: str = "rules") -> ApprovalPolicy:
    """rules: (name, conditions, outcome[, question]) in order."""
    policy = ApprovalPolicy.objects.create(release=release, name="LLaMA 7B intake", mode=mode)
    for position, (name, conditions, outcome, *question) in enumerate(rules):
        PolicyRule.objects.create(
            policy=policy,
            position=position,
            name=name,
            conditions=conditions,
            outcome=outcome,
            question=question[0] if question else "",
        )
    return policy


INSTITUTIONAL = (
    "verified institutional email with ORCID",
    [
        {"type": "email_verified"},
        {"type": "email_domain_in", "domains": ["example.edu"]},
        {"type": "orcid_valid"},
    ],
    "approve",
)


# --- end to end --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_matching_application_is_approved_end_to_end_through_the_reviewers_services(
    monkeypatch, alice, password, make_submitted, releases, client
):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    policy = policy_for(releases["llama-7b"], INSTITUTIONAL)
    rule = policy.rules.get()
    with receiving() as receiver:
        WebhookEndpoint.objects.create(
            url=receiver.url(), event_types=["application.submitted", "application.approved"]
        )
        application = make_submitted(alice, slugs=("llama-7b",), orcid=VALID_ORCID)
        assert receiver.types() == ["application.submitted", "application.approved"]
        approved_hook = receiver.received[1].payload["data"]

    application.refresh_from_db()
    assert application.status == S.APPROVED and application.decided_at is not None
    grant = Grant.objects.get(user=alice)
    assert grant.release.slug == "llama-7b" and grant.is_active()
    assert grant.granted_by.username == POLICY_ACTOR_USERNAME
    assert not grant.granted_by.is_active and not grant.granted_by.has_usable_password()

    event = application.events.get(action=A.APPROVED)
    label = "policy LLaMA 7B intake: rule verified institutional email with ORCID"
    assert event.policy_rule == rule and event.actor_label == label
    assert event.message == f"Approved automatically by {label}."
    assert event.releases == ["llama-7b"] and event.from_status == S.SUBMITTED

    approval_mail = [m for m in mail.outbox if "approved" in m.subject.lower()]
    assert len(approval_mail) == 1 and approval_mail[0].to == [alice.email]
    assert f"Approved automatically by {label}." in approval_mail[0].body
    assert DownloadLink.objects.filter(grant=grant, emailed_at__isnull=False).count() == 1
    assert any("download link" in m.subject and m.to == [alice.email] for m in mail.outbox)

    assert approved_hook["grants"] == [{"id": grant.pk, "release": "llama-7b"}]
    assert approved_hook["actor_id"] == grant.granted_by_id

    # The researcher's own timeline shows who decided.
    client.force_login(alice)
    page = client.get(reverse("access:application_detail", args=[application.pk]))
    assert page.status_code == 200
    assert f"Approved automatically by {label}." in page.content.decode()


def test_a_request_form_answer_decides_with_the_release_form(
    alice, bob, license_v1, releases, django_capture_on_commit_callbacks
):
    from access.services.request_forms import QuestionSpec, request_form_create
    from tests.conftest import FIELDS
    from tests.factories import accept_license

    release = releases["llama-7b"]
    request_form_create(
        release=release,
        questions=[QuestionSpec(key="non_commercial", kind="checkbox", label="Non-commercial?")],
    )
    policy_for(
        release,
        (
            "promises non-commercial use",
            [{"type": "answer_equals", "key": "non_commercial", "value": True}],
            "approve",
        ),
    )
    decided = {}
    for user, answer in [(alice, True), (bob, False)]:
        draft = applications.application_save_draft(
            applicant=user,
            fields={**FIELDS, "institutional_email": user.email},
            releases=[release],
            answers={"llama-7b": {"non_commercial": answer}},
        )
        with django_capture_on_commit_callbacks(execute=True):
            applications.application_submit(
                application=draft,
                applicant=user,
                license_acceptance=accept_license(user, license_v1),
            )
        draft.refresh_from_db()
        decided[user.username] = draft.status
    assert decided == {"alice": S.APPROVED, "bob": S.SUBMITTED}
    assert Grant.objects.get().user == alice


def test_a_non_matching_application_is_held_for_a_person_with_the_reason(
    bob, make_submitted, releases, django_capture_on_commit_callbacks
):
    policy = policy_for(releases["llama-7b"], INSTITUTIONAL)
    with django_capture_on_commit_callbacks(execute=True):
        application = make_submitted(bob, slugs=("llama-7b",), orcid=VALID_ORCID)
    application.refresh_from_db()
    assert application.status == S.SUBMITTED
    assert not Grant.objects.exists()
    held = application.events.get(action=A.HELD)
    assert held.from_status == held.to_status == S.SUBMITTED
    assert held.actor.username == POLICY_ACTOR_USERNAME and held.policy_rule is None
    assert held.actor_label == f"policy {policy.name}: no rule matched"
    assert "LLaMA 7B: held (policy LLaMA 7B intake: no rule matched)" in held.message
    assert not [m for m in mail.outbox if "approved" in m.subject.lower()]


def test_a_hold_rule_names_itself_and_stops_later_rules(
    make_submitted, releases, django_capture_on_commit_callbacks
):
    free = UserFactory(username="frank", email="frank@gmail.com")
    policy_for(
        releases["llama-7b"],
        ("free mail", [{"type": "free_mail_domain"}], "hold"),
        ("anyone else", [], "approve"),
    )
    with django_capture_on_commit_callbacks(execute=True):
        application = make_submitted(free, slugs=("llama-7b",))
    application.refresh_from_db()
    assert application.status == S.SUBMITTED
    held = application.events.get(action=A.HELD)
    assert held.policy_rule.name == "free mail"
    assert held.message.startswith("Held for a reviewer by policy LLaMA 7B intake: rule free mail")


def test_request_info_asks_the_stock_question_once_then_holds_after_the_answer(
    alice, make_submitted, releases, django_capture_on_commit_callbacks
):
    policy_for(
        releases["llama-7b"],
        (
            "industry asks",
            [{"type": "organisation_type_in", "types": ["industry_lab"]}],
            "request_info",
            QUESTION,
        ),
    )
    with django_capture_on_commit_callbacks(execute=True):
        application = make_submitted(alice, slugs=("llama-7b",), organisation_type="industry_lab")
    application.refresh_from_db()
    assert application.status == S.INFO_REQUESTED
    asked = application.events.get(action=A.INFO_REQUESTED)
    assert asked.message == QUESTION and asked.policy_rule.name == "industry asks"
    (question_mail,) = [m for m in mail.outbox if QUESTION in m.body]
    assert question_mail.to == [alice.email]

    with django_capture_on_commit_callbacks(execute=True):
        applications.application_answer(
            application=application, applicant=alice, answer="The NLP group, led by Prof. X."
        )
    application.refresh_from_db()
    assert application.status == S.SUBMITTED  # back in the queue for a person
    assert application.events.filter(action=A.INFO_REQUESTED).count() == 1
    held = application.events.get(action=A.HELD)
    assert "question already answered" in held.message


@pytest.mark.parametrize("mode", ["manual", None])
def test_manual_releases_change_nothing(
    mode, alice, make_submitted, releases, django_capture_on_commit_callbacks
):
    if mode:
        policy_for(releases["llama-7b"], ("anyone", [], "approve"), mode=mode)
    with django_capture_on_commit_callbacks(execute=True):
        application = make_submitted(alice, slugs=("llama-7b",))
    application.refresh_from_db()
    assert application.status == S.SUBMITTED
    assert list(application.events.values_list("action", flat=True)) == [A.CREATED, A.SUBMITTED]
    assert policies_apply(application.pk) == "skipped"
    assert not Grant.objects.exists()


def test_mixed_outcomes_leave_the_whole_application_to_a_person(
    alice, make_submitted, releases, django_capture_on_commit_callbacks
):
    policy_for(releases["llama-7b"], ("anyone", [], "approve"))
    with django_capture_on_commit_callbacks(execute=True):
        application = make_submitted(alice, slugs=("llama-7b", "llama-13b"))
    application.refresh_from_db()
    assert application.status == S.SUBMITTED and not Grant.objects.exists()
    held = application.events.get(action=A.HELD)
    assert "LLaMA 7B: would be approved" in held.message
    assert "LLaMA 13B: held (manual review)" in held.message
    assert held.releases == ["llama-13b", "llama-7b"]


def test_applying_twice_writes_one_hold_and_never_acts_on_a_decided_application(
    alice, bob, reviewer, make_submitted, releases, django_capture_on_commit_callbacks
):
    policy_for(releases["llama-7b"], ("free mail", [{"type": "free_mail_domain"}], "approve"))
    with django_capture_on_commit_callbacks(execute=True):
        application = make_submitted(alice, slugs=("llama-7b",))
    assert policies_apply(application.pk) == "held"
    assert application.events.filter(action=A.HELD).count() == 1
    reviews.application_reject(application=application, reviewer=reviewer, reason="Not eligible.")
    assert policies_apply(application.pk) == "skipped"


# --- evaluation -------------------------------------------------------------------------------


def test_first_matching_rule_wins_in_position_order(releases):
    policy = policy_for(
        releases["llama-7b"],
        ("academics", [{"type": "organisation_type_in", "types": ["academic"]}], "approve"),
        ("everyone", [], "hold"),
    )
    facts = Facts(organisation_type="academic")
    decision = policy_evaluate(facts, Release.objects.get(slug="llama-7b"))
    assert (decision.outcome, decision.rule.name) == ("approve", "academics")
    assert decision.explanation == "policy LLaMA 7B intake: rule academics"
    policy.rules.filter(name="everyone").update(position=0)
    policy.rules.filter(name="academics").update(position=1)
    decision = policy_evaluate(facts, Release.objects.get(slug="llama-7b"))
    assert (decision.outcome, decision.rule.name) == ("hold", "everyone")
    assert policy_evaluate(Facts(organisation_type="other"), releases["llama-13b"]).rule is None


def test_evaluation_runs_no_query_once_the_policy_is_loaded(releases, django_assert_num_queries):
    policy_for(releases["llama-7b"], INSTITUTIONAL, ("anyone", [], "hold"))
    release = Release.objects.get(slug="llama-7b")
    policy_load(release)
    facts = [Facts(institutional_email=f"p{i}@example.edu", orcid=VALID_ORCID) for i in range(50)]
    with django_assert_num_queries(0):
        outcomes = {policy_evaluate(item, release).outcome for item in facts}
    assert outcomes == {"hold"}  # none verified


VERIFIED = Facts(
    institutional_email="Ada@CS.Ox.ac.uk",
    verified_emails=frozenset({"ada@cs.ox.ac.uk"}),
    orcid=VALID_ORCID,
    country="GB",
    organisation_type="academic",
    answers={"llama-7b": {"non_commercial": True, "field": "Linguistics "}},
)
OTHER = Facts(
    institutional_email="bo@gmail.com",
    verified_emails=frozenset({"bo@gmail.com"}),
    orcid="0000-0002-1825-0098",  # wrong check digit
    country="IR",
    organisation_type="industry_lab",
    answers={"llama-7b": {"non_commercial": "yes", "field": "Physics"}},
)


@pytest.mark.parametrize(
    ("condition", "true_for", "false_for"),
    [
        ({"type": "email_domain_in", "domains": ["ox.ac.uk"]}, VERIFIED, OTHER),
        ({"type": "email_domain_not_in", "domains": ["ox.ac.uk"]}, OTHER, VERIFIED),
        ({"type": "free_mail_domain"}, OTHER, VERIFIED),
        ({"type": "email_verified"}, VERIFIED, Facts(institutional_email="x@ox.ac.uk")),
        ({"type": "orcid_valid"}, VERIFIED, OTHER),
        ({"type": "orcid_valid"}, VERIFIED, Facts()),
        ({"type": "country_in", "countries": ["GB", "FR"]}, VERIFIED, OTHER),
        ({"type": "organisation_type_in", "types": ["industry_lab"]}, OTHER, VERIFIED),
        ({"type": "answer_equals", "key": "non_commercial", "value": True}, VERIFIED, OTHER),
        ({"type": "answer_equals", "key": "field", "value": "linguistics"}, VERIFIED, OTHER),
        ({"type": "answer_equals", "key": "field", "value": "physics"}, OTHER, Facts()),
    ],
)
def test_each_condition_type_is_true_and_false(condition, true_for, false_for):
    assert conditions_errors([condition]) == []
    (test,) = conditions_compile([condition], "llama-7b")
    assert test(true_for) is True
    assert test(false_for) is False


def test_answers_of_another_release_do_not_count():
    (test,) = conditions_compile(
        [{"type": "answer_equals", "key": "non_commercial", "value": True}], "llama-13b"
    )
    assert test(VERIFIED) is False


def test_facts_of_many_applications_take_two_queries(
    alice, bob, make_submitted, django_assert_num_queries
):
    applications = [make_submitted(alice), make_submitted(bob)]
    with django_assert_num_queries(2):  # verified addresses, then every request-form answer
        facts = approval_policies.facts_load(applications)
    assert set(facts) == {a.pk for a in applications}


def test_facts_read_the_application_and_verified_addresses(alice, make_submitted):
    application = make_submitted(alice, orcid=VALID_ORCID, country="DE")
    facts = approval_policies.facts_for(Application.objects.get(pk=application.pk))
    assert facts.verified_emails == frozenset({"alice@uni.example.edu"})
    assert (facts.country, facts.orcid, facts.email_domain) == (
        "DE",
        VALID_ORCID,
        "uni.example.edu",
    )
    assert facts.answers == {}


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"type": "x"}, "must be a list"),
        ([{"type": "email_domain_is"}], 'unknown type "email_domain_is"'),
        (["email_verified"], 'an object with a "type"'),
        ([{"type": "email_domain_in"}], 'needs "domains"'),
        ([{"type": "email_domain_in", "domains": ["", "a.org"]}], "non-empty strings"),
        ([{"type": "country_in", "countries": ["GB", "XX"]}], "unknown country codes: XX"),
        ([{"type": "organisation_type_in", "types": ["church"]}], "unknown organisation types"),
        ([{"type": "answer_equals", "value": "yes"}], 'needs "key"'),
        ([{"type": "answer_equals", "key": "k", "value": ["a"]}], 'needs "value"'),
    ],
)
def test_bad_conditions_are_described_precisely(conditions, expected):
    problems = conditions_errors(conditions)
    assert len(problems) == 1 and expected in problems[0]


# --- admin -----------------------------------------------------------------------------------


@pytest.fixture
def admin_client(client, password, db):
    admin_user = UserFactory(
        username="ops", email="ops@portal.example.org", is_staff=True, is_superuser=True
    )
    return login_with_2fa(client, admin_user, password)


def _policy_form(release: Release, **rule) -> dict[str, str]:
    return {
        "release": str(release.pk),
        "name": "7B intake",
        "mode": "rules",
        "rules-TOTAL_FORMS": "1",
        "rules-INITIAL_FORMS": "0",
        "rules-MIN_NUM_FORMS": "0",
        "rules-MAX_NUM_FORMS": "1000",
        "rules-0-position": "0",
        "rules-0-name": rule.get("name", "institutions"),
        "rules-0-conditions": rule.get("conditions", '[{"type": "email_verified"}]'),
        "rules-0-outcome": rule.get("outcome", "approve"),
        "rules-0-question": rule.get("question", ""),
    }


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"conditions": '[{"type": "orcid_is_cool"}]'}, "unknown type &quot;orcid_is_cool&quot;"),
        ({"conditions": '[{"type": "country_in", "countries": "GB"}]'}, "a non-empty list"),
        ({"outcome": "request_info"}, "A rule that requests information needs a question."),
        ({"outcome": "reject"}, "Select a valid choice."),
    ],
)
def test_the_admin_refuses_a_bad_rule_with_a_form_error(admin_client, releases, rule, message):
    url = reverse("admin:access_approvalpolicy_add")
    response = admin_client.post(url, _policy_form(releases["llama-7b"], **rule))
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not ApprovalPolicy.objects.exists() and not PolicyRule.objects.exists()


def test_the_admin_saves_a_policy_with_its_rules(admin_client, releases):
    url = reverse("admin:access_approvalpolicy_add")
    response = admin_client.post(
        url, _policy_form(releases["llama-7b"], outcome="request_info", question=QUESTION)
    )
    assert response.status_code == 302
    rule = PolicyRule.objects.get()
    assert rule.policy.release.slug == "llama-7b" and rule.question == QUESTION
    assert rule.conditions == [{"type": "email_verified"}]
    page = admin_client.get(reverse("admin:access_approvalpolicy_change", args=[rule.policy.pk]))
    assert reverse("admin:access_approvalpolicy_dry_run", args=[rule.policy.pk]) in (
        page.content.decode()
    )


def test_a_policy_may_not_reject_or_revoke(alice, make_submitted, releases):
    policy = policy_for(releases["llama-7b"], ("anyone", [], "approve"))
    decider = reviews.PolicyDecider(
        rule=policy.rules.get(), label="policy x: rule y", user=approval_policies.policy_actor()
    )
    application = make_submitted(alice)
    with pytest.raises(errors.NotAllowed):
        reviews.application_reject(application=application, reviewer=decider, reason="no")
    grant = reviews.application_approve(
        application=application, reviewer=decider, releases=[releases["llama-7b"]]
    )[0]
    with pytest.raises(errors.NotAllowed):
        reviews.grant_revoke(grant=grant, reviewer=decider, reason="no")
    with pytest.raises(errors.NotAllowed):
        reviews.application_revoke(application=application, reviewer=decider, reason="no")


# --- overrides -----------------------------------------------------------------------------


def test_a_reviewer_decides_a_held_application_from_the_admin(
    bob, reviewer, reviewer_client, make_submitted, releases, django_capture_on_commit_callbacks
):
    policy_for(releases["llama-7b"], INSTITUTIONAL)
    with django_capture_on_commit_callbacks(execute=True):
        application = make_submitted(bob, slugs=("llama-7b",))
    assert application.events.filter(action=A.HELD).exists()
    change = reviewer_client.get(reverse("admin:access_application_change", args=[application.pk]))
    body = change.content.decode()
    assert reverse("admin:access_application_approve", args=[application.pk]) in body
    assert "Held for a reviewer by policy LLaMA 7B intake: no rule matched" in body
    response = reviewer_client.post(
        reverse("admin:access_application_approve", args=[application.pk]),
        {"releases": [releases["llama-7b"].pk], "note": "Known collaborator."},
    )
    assert response.status_code == 302
    grant = Grant.objects.get(user=bob)
    assert grant.granted_by == reviewer
    assert application.events.get(action=A.APPROVED).actor == reviewer


def test_a_reviewer_revokes_an_automatic_approval(
    alice, reviewer, reviewer_client, make_submitted, releases, django_capture_on_commit_callbacks
):
    policy_for(releases["llama-7b"], ("anyone", [], "approve"))
    with django_capture_on_commit_callbacks(execute=True):
        application = make_submitted(alice, slugs=("llama-7b",))
    grant = Grant.objects.get(user=alice)
    change = reviewer_client.get(reverse("admin:access_application_change", args=[application.pk]))
    assert reverse("admin:access_application_revoke", args=[application.pk]) in (
        change.content.decode()
    )
    reviews.grant_revoke(grant=grant, reviewer=reviewer, reason="Shared the weights.")
    grant.refresh_from_db()
    assert grant.revoked_by == reviewer and grant.revoked_at is not None
    response = reviewer_client.post(
        reverse("admin:access_application_revoke", args=[application.pk]),
        {"reason": "Shared the weights."},
    )
    assert response.status_code == 302
    application.refresh_from_db()
    assert application.status == S.REVOKED


# --- dry run -----------------------------------------------------------------------------------


@pytest.fixture
def history(reviewer, make_submitted, releases, django_capture_on_commit_callbacks):
    """One automatic approval, then four reviewer decisions (oldest first)."""
    policy = policy_for(
        releases["llama-7b"],
        ("example.edu", [{"type": "email_domain_in", "domains": ["uni.example.edu"]}], "approve"),
    )
    auto = UserFactory(username="auto")
    with django_capture_on_commit_callbacks(execute=True):
        make_submitted(auto, slugs=("llama-7b",))
    assert Grant.objects.filter(user=auto).exists()
    policy.mode = ApprovalPolicy.Mode.MANUAL
    policy.save()
    decided = {}
    for name, email, verdict in [
        ("ann", "ann@uni.example.edu", "approve"),  # agree
        ("ben", "ben@uni.example.edu", "reject"),  # policy would approve: disagree
        ("cat", "cat@lab.example.org", "reject"),  # policy holds: agree
        ("dan", "dan@lab.example.org", "approve"),  # policy holds: disagree
    ]:
        application = make_submitted(UserFactory(username=name, email=email), slugs=("llama-7b",))
        if verdict == "approve":
            reviews.application_approve(
                application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
            )
        else:
            reviews.application_reject(application=application, reviewer=reviewer, reason="No.")
        decided[name] = application.pk
    return decided


def _dry_run(*args: str) -> tuple[list[str], dict]:
    out = io.StringIO()
    call_command("policy_dry_run", *args, stdout=out)
    lines = out.getvalue().strip().splitlines()
    return lines, json.loads(lines[-1])


def test_dry_run_reports_agreement_with_reviewers_only(history):
    lines, report = _dry_run("--release", "llama-7b", "--last", "10")
    assert report["evaluated"] == 4 and report["agreed"] == 2  # the policy's own is left out
    assert report["agreement_rate"] == 0.5 and report["would_approve_rejected"] == 1
    assert sorted(report["disagreements"], key=lambda d: d["application_id"]) == [
        {
            "application_id": history["ben"],
            "rule": "example.edu",
            "policy_outcome": "approve",
            "human_outcome": "reject",
        },
        {
            "application_id": history["dan"],
            "rule": "",
            "policy_outcome": "hold",
            "human_outcome": "approve",
        },
    ]
    assert "agrees with 2 of 4 reviewer decisions (50.0%)" in lines[0]


def test_dry_run_takes_the_last_n_decisions(history):
    _, report = _dry_run("--release", "llama-7b", "--last", "2")
    assert report["evaluated"] == 2 and report["agreement_rate"] == 0.5
    assert [d["application_id"] for d in report["disagreements"]] == [history["dan"]]


def test_dry_run_refuses_unknown_releases_and_reports_no_policy(releases):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="No release with slug 'nope'"):
        _dry_run("--release", "nope")
    lines, report = _dry_run("--release", "llama-13b")
    assert lines[0] == "llama-13b has no approval policy." and report["evaluated"] == 0


def test_dry_run_page_in_the_admin(admin_client, history):
    policy = ApprovalPolicy.objects.get()
    url = reverse("admin:access_approvalpolicy_dry_run", args=[policy.pk])
    response = admin_client.get(url, {"last": "10"})
    body = response.content.decode()
    assert response.status_code == 200
    assert 'data-agreement="0.5"' in body and "50%" in body
    assert body.count('class="disagreement"') == 2
    action = admin_client.post(
        reverse("admin:access_approvalpolicy_changelist"),
        {"action": "dry_run_selected", "_selected_action": [policy.pk]},
    )
    assert action.status_code == 200 and 'data-agreement="0.5"' in action.content.decode()


# --- throughput --------------------------------------------------------------------------------


def test_policy_throughput_clears_a_loose_floor():
    result = policy_throughput(5000)
    assert result["applications"] == 5000 and result["rules"] == 5
    assert sum(result["outcomes"].values()) == 5000 and set(result["outcomes"]) == {
        "approve",
        "hold",
        "request_info",
    }
    assert result["applications_per_second"] >= 300


def test_decide_without_rules_holds(releases):
    policy = policy_for(releases["llama-7b"])
    loaded = approval_policies.policy_compile(policy, [], release_slug="llama-7b")
    assert decide(loaded, VERIFIED).outcome == "hold"
