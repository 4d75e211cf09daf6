"""Issuing, emailing, refreshing and revoking download links."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.core import mail
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from access.models import Grant
from access.services import reviews
from weights import tokens
from weights.models import Artifact, DownloadLink, LinkUsage
from weights.services import budget, links
from weights.tasks import issue_missing_links

pytestmark = pytest.mark.django_db
LINK_IN_MAIL = re.compile(r"http://[^/\s]+/d/([A-Za-z0-9_-]+)/")


@pytest.fixture
def approved(alice, reviewer, make_submitted, releases, django_capture_on_commit_callbacks):
    application = make_submitted(alice)
    with django_capture_on_commit_callbacks(execute=True):
        reviews.application_approve(
            application=application,
            reviewer=reviewer,
            releases=[releases["llama-7b"], releases["llama-13b"]],
        )
    return application


def _link_mails():
    return [m for m in mail.outbox if "download link" in m.subject]


def test_each_new_grant_gets_one_emailed_link_whose_token_is_stored_only_hashed(approved, alice):
    sent = _link_mails()
    prefix = "[LLaMA access] Your download link for "
    assert sorted(m.subject.removeprefix(prefix) for m in sent) == ["LLaMA 13B", "LLaMA 7B"]
    for message in sent:
        assert message.to == [alice.email]
        (token,) = set(LINK_IN_MAIL.findall(message.body))
        assert len(token) >= 32 and tokens.looks_like_token(token)  # 192 random bits
        link = DownloadLink.objects.get(token_hash=tokens.token_hash(token))
        assert link.emailed_at is not None and link.budget_copies == 5
        assert (
            timedelta(hours=23, minutes=59)
            < link.expires_at - link.created_at
            <= timedelta(hours=24)
        )
        # The token itself is nowhere in the database.
        assert not DownloadLink.objects.filter(token_hash=token).exists()
        assert token not in str(list(DownloadLink.objects.values()))
        assert "weights.download" in message.body and link.grant.user == alice


def test_issuing_is_idempotent(approved):
    grant = Grant.objects.filter(application=approved).first()
    assert links.link_issue_and_email(grant_id=grant.pk) is False
    assert len(_link_mails()) == 2
    assert DownloadLink.objects.filter(grant=grant).count() == 1


@override_settings(WEIGHTS_LINK_LIFETIME_HOURS=2, WEIGHTS_LINK_BUDGET_COPIES=3)
def test_lifetime_and_budget_come_from_settings(approved):
    issued = links.link_issue(grant=DownloadLink.objects.first().grant)
    assert issued.link.budget_copies == 3
    assert (
        timedelta(hours=1, minutes=59)
        < issued.link.expires_at - issued.link.created_at
        <= timedelta(hours=2)
    )


def test_grant_created_while_broker_down_gets_its_link_from_the_sweep(
    alice, reviewer, make_submitted, releases
):
    application = make_submitted(alice)
    # on-commit hooks not run: as if the enqueue never reached a worker
    reviews.application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    assert not DownloadLink.objects.exists()
    assert issue_missing_links() == 1
    assert issue_missing_links() == 0
    assert len(_link_mails()) == 1 and DownloadLink.objects.count() == 1


def test_revoking_a_grant_kills_its_link_at_once(
    approved, reviewer, django_capture_on_commit_callbacks
):
    token = LINK_IN_MAIL.findall(_link_mails()[0].body)[0]
    link = DownloadLink.objects.get(token_hash=tokens.token_hash(token))
    assert links.link_resolve(token) == link
    with django_capture_on_commit_callbacks(execute=True):
        reviews.grant_revoke(grant=link.grant, reviewer=reviewer, reason="Shared the weights.")
    link.refresh_from_db()
    assert link.revoked_at is not None
    with pytest.raises(links.LinkRevoked):
        links.link_resolve(token)


def test_revoking_the_approval_kills_every_link(
    approved, reviewer, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        reviews.application_revoke(application=approved, reviewer=reviewer, reason="Breach.")
    assert DownloadLink.objects.filter(revoked_at__isnull=True).count() == 0
    for message in _link_mails():
        with pytest.raises(links.LinkRevoked):
            links.link_resolve(LINK_IN_MAIL.findall(message.body)[0])


def test_resolve_refusals(approved, alice):
    token = LINK_IN_MAIL.findall(_link_mails()[0].body)[0]
    with pytest.raises(links.LinkInvalid):
        links.link_resolve(token[:-1] + ("A" if token[-1] != "A" else "B"))
    with pytest.raises(links.LinkInvalid):
        links.link_resolve(token[:10])
    DownloadLink.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(links.LinkExpired) as exc:
        links.link_resolve(token)
    assert exc.value.status == 410 and exc.value.action_url == reverse("weights:my_downloads")


def test_budget_counts_bytes_and_refunds(approved, releases):
    link = DownloadLink.objects.filter(grant__release=releases["llama-7b"]).get()
    artifact = Artifact.objects.create(
        release=releases["llama-7b"],
        path="7B/consolidated.00.pth",
        size=100,
        sha256="0" * 64,
        md5="0" * 32,
        storage_key="k",
    )
    link.budget_copies = 2
    usage = LinkUsage.objects.filter(link=link, artifact=artifact)
    for _ in range(4):
        assert budget.charge(link=link, artifact=artifact, paid=50)
    # Each file has a slack over N copies (here its size, being under the setting).
    assert budget.budget_ceiling(link, artifact) == 300
    assert budget.charge(link=link, artifact=artifact, paid=100)
    assert not budget.charge(link=link, artifact=artifact, paid=1)
    assert usage.get().bytes_charged == 300
    budget.refund(link=link, artifact=artifact, paid=30)
    assert usage.get().bytes_charged == 270
    assert budget.charge(link=link, artifact=artifact, paid=30)
    assert not budget.charge(link=link, artifact=artifact, paid=1)
    # Free bytes are capped too (WEIGHTS_RESUME_FREE_COPIES copies' worth); past the cap
    # they are charged, and refused when the budget cannot take them.
    assert budget.charge(link=link, artifact=artifact, paid=0, free=200)
    assert not budget.charge(link=link, artifact=artifact, paid=0, free=1)
    assert (usage.get().bytes_charged, usage.get().bytes_forgiven) == (300, 200)


def test_my_downloads_lists_grants_expiry_and_budget_per_file(client, approved, alice, releases):
    Artifact.objects.create(
        release=releases["llama-7b"],
        path="7B/params.json",
        size=2048,
        sha256="a" * 64,
        md5="b" * 32,
        storage_key="x",
    )
    client.force_login(alice)
    page = client.get(reverse("weights:my_downloads")).content.decode()
    assert "LLaMA 7B" in page and "LLaMA 13B" in page
    assert "7B/params.json" in page and "5 copies left" in page and "expires" in page


def test_fresh_link_revokes_the_old_one_and_is_shown_once(client, approved, alice):
    old_token = LINK_IN_MAIL.findall(_link_mails()[0].body)[0]
    grant = DownloadLink.objects.get(token_hash=tokens.token_hash(old_token)).grant
    client.force_login(alice)
    response = client.post(reverse("weights:fresh_link", args=[grant.pk]), follow=True)
    page = response.content.decode()
    (new_token,) = set(re.findall(r"/d/([A-Za-z0-9_-]{32})/", page))
    assert new_token != old_token
    assert links.link_resolve(new_token).grant == grant
    with pytest.raises(links.LinkRevoked):
        links.link_resolve(old_token)
    again = client.get(reverse("weights:my_downloads")).content.decode()
    assert new_token not in again  # shown once


@override_settings(WEIGHTS_FRESH_LINK_RATE="2/h")
def test_fresh_links_are_rate_limited(client, approved, alice):
    grant = Grant.objects.filter(user=alice).first()
    client.force_login(alice)
    url = reverse("weights:fresh_link", args=[grant.pk])
    client.post(url)
    client.post(url)
    live_before = DownloadLink.objects.get(grant=grant, revoked_at__isnull=True)
    response = client.post(url, follow=True)
    assert "try again in an hour" in response.content.decode()
    assert DownloadLink.objects.get(grant=grant, revoked_at__isnull=True) == live_before


def test_charlie_cannot_get_a_link_for_alices_grant(client, approved, charlie):
    grant = Grant.objects.filter(application=approved).first()
    client.force_login(charlie)
    assert client.post(reverse("weights:fresh_link", args=[grant.pk])).status_code == 404
    assert DownloadLink.objects.filter(grant=grant).count() == 1
    page = client.get(reverse("weights:my_downloads")).content.decode()
    assert "LLaMA 7B" not in page and "no access yet" in page


def test_fresh_link_for_a_revoked_grant_is_refused(client, approved, alice, reviewer):
    grant = Grant.objects.filter(application=approved).first()
    reviews.grant_revoke(grant=grant, reviewer=reviewer, reason="x")
    client.force_login(alice)
    response = client.post(reverse("weights:fresh_link", args=[grant.pk]), follow=True)
    assert "was revoked" in response.content.decode()


def test_catalogue_shows_size_files_and_license(client, releases, license_v1):
    release = releases["llama-7b"]
    release.license = license_v1
    release.save()
    for i, size in enumerate([3 * 1024**3, 1024**3]):
        Artifact.objects.create(
            release=release,
            path=f"f{i}",
            size=size,
            sha256="0" * 64,
            md5="0" * 32,
            storage_key=f"k{i}",
        )
    page = client.get(reverse("weights:catalogue")).content.decode()
    assert "LLaMA 7B" in page and "4.0\xa0GB" in page and "LLaMA 65B" in page
    assert str(license_v1) in page


def test_reviewer_revokes_a_link_in_the_admin(reviewer_client, approved):
    link = DownloadLink.objects.first()
    url = reverse("admin:weights_downloadlink_changelist")
    assert link.token_hint in reviewer_client.get(url).content.decode()
    response = reviewer_client.post(
        url,
        {
            "action": "revoke_selected_links",
            "_selected_action": [link.pk],
            "confirm": "yes",
            "reason": "Leaked.",
        },
    )
    assert response.status_code == 302, response.content[:3000]
    link.refresh_from_db()
    assert link.revoked_at is not None and link.revoke_reason == "Leaked."


def test_a_link_closed_by_the_expiry_sweep_still_reads_as_expired(approved):
    from weights.services.links import EXPIRED_REASON

    token = LINK_IN_MAIL.findall(_link_mails()[0].body)[0]
    past = timezone.now() - timedelta(days=2)
    DownloadLink.objects.update(expires_at=past, revoked_at=past, revoke_reason=EXPIRED_REASON)
    with pytest.raises(links.LinkExpired):
        links.link_resolve(token)


def test_a_release_name_with_line_breaks_still_gets_its_link_mailed(
    alice, reviewer, make_submitted, releases, django_capture_on_commit_callbacks
):
    releases["llama-7b"].name = "LLaMA\r\n7B\u202e"
    releases["llama-7b"].save()
    application = make_submitted(alice, slugs=("llama-7b",))
    with django_capture_on_commit_callbacks(execute=True):
        reviews.application_approve(
            application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
        )
    (message,) = _link_mails()
    assert message.subject == "[LLaMA access] Your download link for LLaMA 7B"
    assert message.message()["Subject"] == message.subject  # BadHeaderError before
    assert DownloadLink.objects.get().emailed_at is not None
