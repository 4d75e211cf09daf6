"""Operator commands: create_reviewer, rotate_links, export_records, portal_stats."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import timedelta

import pytest
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.core import mail
from django.core.management import CommandError, call_command
from django.utils import timezone

from access.models import Application, ApplicationEvent, Grant
from access.services.reviews import application_approve, application_reject
from inference_demo.models import DemoRequest
from weights.models import Artifact, DownloadEvent, DownloadLink
from weights.services.links import link_issue


def run(*args, stdin: str | None = None) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    extra = {"stdin": io.StringIO(stdin)} if stdin is not None else {}
    call_command(*args, stdout=out, stderr=err, **extra)
    return out.getvalue(), err.getvalue()


# --- create_reviewer ---------------------------------------------------------------------


def test_create_reviewer_makes_a_verified_staff_reviewer(db, settings):
    out, _ = run(
        "create_reviewer",
        "Rev@Lab.example.org",
        "--password-stdin",
        stdin="a long pass phrase 42\n",
    )
    user = get_user_model().objects.get(email="Rev@Lab.example.org")
    assert user.is_staff and not user.is_superuser and user.check_password("a long pass phrase 42")
    assert list(user.groups.values_list("name", flat=True)) == [settings.PORTAL_REVIEWERS_GROUP]
    address = EmailAddress.objects.get(user=user)
    assert address.verified and address.primary
    assert out.startswith("Created reviewer Rev@Lab.example.org.")
    assert "TOTP" in out and "a long pass phrase" not in out


def test_create_reviewer_upgrades_an_existing_user_and_can_rerun(alice, password):
    for _ in range(2):
        out, _ = run("create_reviewer", alice.email, "--superuser")
    alice.refresh_from_db()
    assert alice.is_staff and alice.is_superuser and alice.check_password(password)
    assert alice.groups.filter(name="Reviewers").exists()
    assert EmailAddress.objects.filter(user=alice).count() == 1
    assert get_user_model().objects.filter(email__iexact=alice.email).count() == 1
    assert out.startswith(f"Updated superuser and reviewer {alice.email}.")


def test_create_reviewer_without_a_password_points_to_the_reset_page(db):
    out, _ = run("create_reviewer", "nopass@lab.example.org")
    assert not get_user_model().objects.get(email="nopass@lab.example.org").has_usable_password()
    assert "/accounts/password/reset/" in out


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["not-an-email"], None, "is not a valid email address"),
        (["weak@lab.example.org", "--password-stdin"], "123\n", "Password refused"),
        (["empty@lab.example.org", "--password-stdin"], "\n", "no password on standard input"),
    ],
)
def test_create_reviewer_refuses_bad_input(db, args, stdin, message):
    with pytest.raises(CommandError, match=message):
        run("create_reviewer", *args, stdin=stdin)
    assert not get_user_model().objects.filter(is_staff=True).exists()


# --- rotate_links ------------------------------------------------------------------------


@pytest.fixture
def links(alice, bob, charlie, reviewer, make_submitted, releases):
    """Live links: alice and bob for 7B, alice for 13B; charlie's 7B grant is revoked."""
    issued = {}
    for user, slugs in ((alice, ("llama-7b", "llama-13b")), (bob, ("llama-7b",))):
        application = make_submitted(user, slugs=slugs)
        for grant in application_approve(
            application=application, reviewer=reviewer, releases=[releases[s] for s in slugs]
        ):
            issued[(user.username, grant.release.slug)] = link_issue(grant=grant)
    mail.outbox.clear()
    return issued


def _token(message) -> str:
    return re.search(r"/d/([A-Za-z0-9_-]{32})/", message.body).group(1)


def test_rotate_links_revokes_and_emails_fresh_links(client, links):
    out, _ = run("rotate_links", "--release", "llama-7b")
    assert "Rotated 2 link(s) of llama-7b" in out
    assert sorted(m.to[0] for m in mail.outbox) == ["alice@uni.example.edu", "bob@lab.example.org"]
    for key in (("alice", "llama-7b"), ("bob", "llama-7b")):
        assert client.get(links[key].path).status_code == 403
        revoked = DownloadLink.objects.get(pk=links[key].link.pk)
        assert revoked.revoke_reason == "Rotated by an operator."
    for message in mail.outbox:
        token = _token(message)
        assert token not in out
        assert client.get(f"/d/{token}/").status_code == 200
    assert (
        DownloadLink.objects.filter(emailed_at__isnull=False, revoked_at__isnull=True).count() == 2
    )
    assert client.get(links[("alice", "llama-13b")].path).status_code == 200  # other release


def test_rotate_links_without_email_only_revokes(client, links):
    out, _ = run("rotate_links", "--release", "llama-7b", "--no-email")
    assert "Revoked 2 link(s) of llama-7b" in out and mail.outbox == []
    assert not DownloadLink.objects.filter(
        grant__release__slug="llama-7b", revoked_at__isnull=True
    ).exists()
    assert client.get(links[("alice", "llama-7b")].path).status_code == 403


def test_rotate_links_needs_a_known_release(db):
    with pytest.raises(CommandError, match="No release 'llama-99b'"):
        run("rotate_links", "--release", "llama-99b")


# --- export_records ----------------------------------------------------------------------


@pytest.fixture
def decided(alice, bob, reviewer, make_submitted, releases):
    approved = make_submitted(alice, slugs=("llama-7b",))
    application_approve(application=approved, reviewer=reviewer, releases=[releases["llama-7b"]])
    rejected = make_submitted(bob, slugs=("llama-13b",), full_name='=HYPERLINK("http://x")')
    application_reject(application=rejected, reviewer=reviewer, reason="Not a research use.")
    return approved, rejected


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_export_decisions(decided, reviewer):
    out, _ = run("export_records", "decisions")
    assert out.splitlines()[0].startswith("event_id,created_at,application_id,applicant_email")
    approve, reject = _rows(out)
    assert (approve["action"], approve["applicant_email"], approve["releases"]) == (
        "approved",
        "alice@uni.example.edu",
        "llama-7b",
    )
    assert approve["actor_email"] == reviewer.email and approve["to_status"] == "approved"
    assert (reject["action"], reject["reason"]) == ("rejected", "Not a research use.")
    assert reject["applicant_name"] == '\'=HYPERLINK("http://x")'  # no formula in a spreadsheet


def test_export_since_and_to_a_file(decided, tmp_path):
    ApplicationEvent.objects.filter(action="rejected").update(
        created_at=timezone.now() - timedelta(days=10)
    )
    since = (timezone.now() - timedelta(days=1)).date().isoformat()
    target = tmp_path / "decisions.csv"
    _, err = run("export_records", "decisions", "--since", since, "--out", str(target))
    rows = _rows(target.read_text())
    assert [r["action"] for r in rows] == ["approved"] and "Wrote 1 decisions rows" in err
    tomorrow = (timezone.now() + timedelta(days=1)).date().isoformat()
    out, _ = run("export_records", "decisions", "--since", tomorrow)
    assert len(out.splitlines()) == 1  # the header alone
    with pytest.raises(CommandError, match="not a date"):
        run("export_records", "decisions", "--since", "last tuesday")


@pytest.fixture
def downloads(decided, alice, releases):
    """Alice's 7B link: a full copy, a partial one and a refusal for budget."""
    issued = link_issue(grant=Grant.objects.get(user=alice, release=releases["llama-7b"]))
    shard = Artifact.objects.create(
        release=releases["llama-7b"],
        path="7B/consolidated.00.pth",
        size=100,
        sha256="0" * 64,
        md5="0" * 32,
        storage_key="k/00",
    )
    for outcome, nbytes, status in (("served", 100, 200), ("partial", 50, 206), ("budget", 0, 429)):
        DownloadEvent.objects.create(
            link=issued.link,
            user=alice,
            artifact=shard,
            ip_address="192.0.2.7",
            user_agent="aria2/1.36",
            bytes=nbytes,
            status_code=status,
            outcome=outcome,
        )
    return issued


def test_export_downloads(downloads):
    out, _ = run("export_records", "downloads")
    assert downloads.token not in out
    rows = _rows(out)
    assert [(r["outcome"], r["bytes"], r["status_code"]) for r in rows] == [
        ("served", "100", "200"),
        ("partial", "50", "206"),
        ("budget", "0", "429"),
    ]
    assert rows[0]["release"] == "llama-7b" and rows[0]["file"] == "7B/consolidated.00.pth"
    assert (
        rows[0]["link"] == downloads.link.token_hint
        and rows[0]["user_email"] == "alice@uni.example.edu"
    )


# --- portal_stats ------------------------------------------------------------------------


def test_portal_stats(decided, downloads, charlie, make_submitted, releases):
    approved, rejected = decided
    now = timezone.now()
    Application.objects.filter(pk=approved.pk).update(submitted_at=now - timedelta(hours=48))
    Application.objects.filter(pk=rejected.pk).update(submitted_at=now - timedelta(hours=96))
    make_submitted(charlie, slugs=("llama-7b",))  # waiting, no decision
    for status, tokens_in, tokens_out in (("done", 10, 20), ("done", 5, 7), ("failed", 3, 0)):
        DemoRequest.objects.create(
            user=charlie,
            release=releases["llama-7b"],
            prompt="p",
            status=status,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )

    out, _ = run("portal_stats", "--json")
    stats = json.loads(out)
    apps = stats["applications"]
    assert apps["by_status"] == {
        "draft": 0,
        "submitted": 1,
        "info_requested": 0,
        "approved": 1,
        "rejected": 1,
        "withdrawn": 0,
        "revoked": 0,
    }
    assert apps["total"] == 3 and apps["decided"] == 2
    assert apps["median_hours_to_decision"] == pytest.approx(72, abs=0.1)  # of 48 h and 96 h
    seven = next(r for r in stats["downloads"] if r["release"] == "llama-7b")
    assert (seven["requests"], seven["delivered"], seven["bytes"]) == (3, 2, 150)
    assert next(r for r in stats["downloads"] if r["release"] == "llama-65b")["requests"] == 0
    assert stats["demo"] == {
        "requests": 3,
        "tokens_in": 18,
        "tokens_out": 27,
        "by_status": {"queued": 0, "running": 0, "done": 2, "failed": 1, "cancelled": 0},
    }

    text, _ = run("portal_stats")
    assert "Applications: 3" in text and "Median time to decision: 72.0 h" in text
    assert re.search(r"llama-7b\s+3\s+2\s+150\s", text) and "Demo: 3 requests" in text
