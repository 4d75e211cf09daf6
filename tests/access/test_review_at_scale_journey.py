"""Issue 12's acceptance path, as people use it: a release with its own question and a rules
policy. Two researchers apply on the page; the one whose answer and email match is approved
at once (approval email, grant, download link emailed), the other is held for a person; the
reviewer's timeline shows both decisions with the rule that made them, and the dry run
agrees with what a reviewer then decides."""

from __future__ import annotations

import html

import pytest
from django.core import mail
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from access.forms import answer_field_name
from access.models import Application, ApplicationEvent, ApprovalPolicy, Grant, PolicyRule
from access.services import request_forms as rf
from access.services import reviews
from access.services.approval_policies import policy_dry_run
from access.services.request_forms import QuestionSpec
from tests.conftest import FIELDS
from tests.factories import UserFactory
from tests.twofactor import login_with_2fa
from weights.models import DownloadLink

pytestmark = pytest.mark.django_db(transaction=True)  # policies run after commit
S = Application.Status


def apply_on_the_page(user, password, release, *, non_commercial: bool) -> Application:
    client = Client()
    client.force_login(user)
    data = {
        **FIELDS,
        "full_name": f"{user.username.title()} Researcher",
        "institutional_email": user.email,
        "requested_releases": [release.pk],
        "accept_license": "on",
        "action": "submit",
    }
    if non_commercial:
        data[answer_field_name(release.pk, "non_commercial")] = "on"
    response = client.post(reverse("access:apply"), data)
    assert response.status_code == 302, response.content.decode()[-2000:]
    return Application.objects.get(applicant=user)


def test_a_custom_form_and_a_policy_approve_one_application_and_hold_the_other(
    releases, license_v1, password, reviewer, monkeypatch
):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    release = releases["llama-7b"]
    rf.request_form_create(
        release=release,
        questions=[
            QuestionSpec("non_commercial", "checkbox", "I will use the weights non-commercially")
        ],
    )
    policy = ApprovalPolicy.objects.create(
        release=release, name="LLaMA 7B intake", mode=ApprovalPolicy.Mode.RULES
    )
    PolicyRule.objects.create(
        policy=policy,
        position=1,
        name="university address, non-commercial",
        conditions=[
            {"type": "email_domain_in", "domains": ["uni.example.edu"]},
            {"type": "answer_equals", "key": "non_commercial", "value": True},
        ],
        outcome=PolicyRule.Outcome.APPROVE,
    )
    alice = UserFactory(username="alice", email="alice@uni.example.edu")
    carol = UserFactory(username="carol", email="carol@uni.example.edu")

    approved = apply_on_the_page(alice, password, release, non_commercial=True)
    held = apply_on_the_page(carol, password, release, non_commercial=False)

    approved.refresh_from_db()
    held.refresh_from_db()
    assert (approved.status, held.status) == (S.APPROVED, S.SUBMITTED)
    grant = Grant.objects.get(user=alice, release=release)
    assert not Grant.objects.filter(user=carol).exists()
    assert DownloadLink.objects.filter(grant=grant, emailed_at__isnull=False).count() == 1
    to_alice = [m.subject for m in mail.outbox if m.to == [alice.email]]
    assert any("approved" in s.lower() for s in to_alice)
    assert any("download link" in s.lower() for s in to_alice)
    assert not any("approved" in m.subject.lower() for m in mail.outbox if m.to == [carol.email])

    label = "policy LLaMA 7B intake: rule university address, non-commercial"
    auto = approved.events.get(action=ApplicationEvent.Action.APPROVED)
    assert (
        auto.actor_label == label and auto.policy_rule.name == "university address, non-commercial"
    )
    hold = held.events.get(action=ApplicationEvent.Action.HELD)
    assert "no rule matched" in hold.actor_label

    # Both decisions in the reviewer's timeline; the applicant sees the approval, not the hold.
    admin = login_with_2fa(Client(), reviewer, password)
    for application, words in ((approved, f"Approved automatically by {label}."), (held, "held")):
        page = admin.get(reverse("admin:access_application_change", args=[application.pk]))
        assert page.status_code == 200 and words in html.unescape(page.content.decode())
    researcher = Client()
    researcher.force_login(carol)
    mine = researcher.get(reverse("access:application_detail", args=[held.pk])).content.decode()
    assert "no rule matched" not in mine

    # A person decides the held one as the policy would have: the dry run agrees.
    reviews.application_reject(application=held, reviewer=reviewer, reason="Commercial use.")
    report = policy_dry_run(release, last=10)
    assert len(report.rows) == 1 and report.agreement_rate == 1.0 and not report.disagreements
    call_command("policy_dry_run", "--release", release.slug, "--last", "10")
