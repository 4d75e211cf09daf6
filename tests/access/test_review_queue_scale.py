"""The queue at scale: constant queries per page, batched screening flags, the seed command, the bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from allauth.account.models import EmailAddress
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from access.models import Application, ApplicationEvent, Grant, Notification
from access.seeding import FREE_MAIL
from access.selectors import screening_flags_for
from access.services.applications import application_save_draft
from tests.factories import UserFactory

REPO = Path(__file__).resolve().parents[2]
Status = Application.Status


def queries_of(client, url: str, **params) -> int:
    client.get(url, params)  # a first visit may refresh the session; count a steady one
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, params)
    assert response.status_code == 200
    return len(captured)


def seed(count: int, releases) -> None:
    call_command(
        "seed_applications", count, releases=",".join(releases), decided_fraction=0.3, seed=7
    )


# --- constant queries ------------------------------------------------------------


def test_queue_page_queries_do_not_grow_with_rows_or_table(reviewer_client, releases):
    changelist = reverse("admin:access_application_changelist")
    seed(5, ["llama-7b", "llama-13b"])
    few = queries_of(reviewer_client, changelist)
    few_search = queries_of(reviewer_client, changelist, q="a")
    seed(55, ["llama-7b", "llama-13b"])
    assert Application.objects.count() == 60
    response = reviewer_client.get(changelist)
    assert len(response.context["cl"].result_list) == 50  # a full page, not five rows
    assert queries_of(reviewer_client, changelist) == few
    assert queries_of(reviewer_client, changelist, q="a") == few_search
    assert few <= 20


def test_detail_page_queries_do_not_grow_with_the_table(reviewer_client, releases):
    seed(5, ["llama-7b", "llama-13b"])
    first = Application.objects.order_by("pk").first()
    url = reverse("admin:access_application_change", args=[first.pk])
    few = queries_of(reviewer_client, url)
    seed(55, ["llama-7b", "llama-13b"])
    last = Application.objects.filter(status=Status.APPROVED).order_by("-pk").first()
    assert queries_of(reviewer_client, url) == few
    # An approved one has grants and a longer timeline: still the same queries.
    assert (
        queries_of(reviewer_client, reverse("admin:access_application_change", args=[last.pk]))
        == few
    )


# --- batched flags ---------------------------------------------------------------


@override_settings(PORTAL_RESTRICTED_COUNTRIES=["KP"])
def test_batched_flags_find_what_row_by_row_found(alice, bob, charlie, make_submitted, releases):
    a = make_submitted(alice, institutional_email="Alice@Gmail.com", country="KP")
    b = make_submitted(bob, full_name="ALICE researcher", institutional_email="bob@unverified.org")
    c = make_submitted(charlie, institutional_email="alice@gmail.com")
    dave = UserFactory(username="dave", email="dave@uni.example.edu")
    rejected = make_submitted(dave)
    Application.objects.filter(pk=rejected.pk).update(status=Status.REJECTED)
    d = Application.objects.create(
        applicant=dave,
        status=Status.SUBMITTED,
        full_name="Dave Again",
        institutional_email=dave.email,
        submitted_at=timezone.now(),
    )
    draft_user = UserFactory(username="erin")
    application_save_draft(
        applicant=draft_user, fields={"full_name": "Alice Researcher"}, releases=[]
    )

    with CaptureQueriesContext(connection) as captured:
        flags = screening_flags_for(Application.objects.filter(pk__in=[a.pk, b.pk, c.pk, d.pk]))
    assert len(captured) == 4  # the applications, then three look-ups for all of them

    def codes(application):
        return [f.code for f in flags[application.pk]]

    assert codes(a) == [
        "restricted_country",
        "free_mail",
        "possible_duplicate",
        "possible_duplicate",
    ]
    messages = [f.message for f in flags[a.pk]]
    assert f"Same name as application #{b.pk} by {bob.email}." in messages
    assert f"Same email as application #{c.pk} by {charlie.email}." in messages
    assert codes(b) == ["unverified_domain", "possible_duplicate"]
    assert codes(c) == ["free_mail", "possible_duplicate"]
    assert codes(d) == ["earlier_rejection"]
    assert flags[d.pk][0].message == "1 earlier application(s) by this person were rejected."
    assert screening_flags_for([]) == {}


# --- seeding ---------------------------------------------------------------------


def test_seed_applications_writes_realistic_rows(releases):
    call_command("seed_applications", 120, releases="llama-7b,llama-65b", decided_fraction=0.5)
    seeded = Application.objects.exclude(applicant__username="seed-reviewer")
    assert seeded.count() == 120
    statuses = set(seeded.values_list("status", flat=True))
    assert {Status.SUBMITTED, Status.APPROVED, Status.REJECTED} <= statuses
    assert not seeded.filter(status=Status.DRAFT).exists()
    assert not seeded.filter(submitted_at__isnull=True).exists()
    assert len(set(seeded.values_list("country", flat=True))) > 5
    assert len(set(seeded.values_list("organisation_type", flat=True))) >= 3
    domains = {
        email.rsplit("@", 1)[1] for email in seeded.values_list("applicant__email", flat=True)
    }
    assert domains & set(FREE_MAIL) and domains - set(FREE_MAIL)
    requested = set(seeded.values_list("requested_releases__slug", flat=True))
    assert requested == {"llama-7b", "llama-65b"}
    assert ApplicationEvent.objects.filter(action="submitted").count() == 120
    approved = seeded.filter(status=Status.APPROVED)
    assert Grant.objects.filter(application__in=approved).count() >= approved.count() > 0
    assert not Grant.objects.exclude(application__in=approved).exists()
    assert EmailAddress.objects.filter(verified=True).count() > 0
    assert not Notification.objects.exists()  # seeding sends nothing


def test_seed_applications_refuses_bad_input_and_writes_nothing(releases):
    with pytest.raises(CommandError, match="unknown releases: llama-1t"):
        call_command("seed_applications", 10, releases="llama-7b,llama-1t")
    with pytest.raises(CommandError, match="at least 1"):
        call_command("seed_applications", 0)
    with pytest.raises(CommandError, match="between 0 and 1"):
        call_command("seed_applications", 5, decided_fraction=1.5)
    assert not Application.objects.exists()


# --- the bench -------------------------------------------------------------------


def test_bench_at_a_tiny_size_reports_every_figure():
    env = {**os.environ}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-m",
            "access.bench",
            "--applications",
            "200",
            "--requests",
            "3",
            "--bulk",
            "20",
            "--policy-n",
            "2000",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["applications"] == 200
    for page in ("queue_default", "queue_search", "queue_country", "detail"):
        assert figures[page]["requests"] == 3
        assert 0 < figures[page]["p50_ms"] <= figures[page]["p95_ms"]
        assert figures[page]["queries"] > 0
    assert figures["bulk_approve"]["applications"] == 20
    assert figures["bulk_approve"]["notifications"] >= 20  # each approval emails through the outbox
    assert figures["digest"]["seconds"] >= 0 and figures["digest"]["emails"] >= 1
    assert figures["policy"] == "not available" or figures["policy"]["applications_per_second"] > 0
    assert set(figures["targets_met"]) == {"pages_p95", "bulk_approve", "policy"}
    assert figures["database"] in ("sqlite", "postgresql")


def test_search_matches_every_word_in_any_field_or_the_account_email(
    reviewer_client, alice, bob, make_submitted
):
    a = make_submitted(alice, institutional_email="a.researcher@physics.example.edu")
    b = make_submitted(bob, affiliation="Lab Paris")
    changelist = reverse("admin:access_application_changelist")

    def found(q: str) -> list[int]:
        return [x.pk for x in reviewer_client.get(changelist, {"q": q}).context["cl"].result_list]

    assert found("uni.example.edu") == [a.pk]  # only the account's email says so
    assert found("physics.example") == [a.pk]
    assert found("lab paris") == [b.pk]  # every word, any field
    assert found('"Lab Paris"') == [b.pk]
    assert found("lab alice") == []
    assert found("researcher") == [a.pk, b.pk]
