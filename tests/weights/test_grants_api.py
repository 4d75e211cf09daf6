"""The grants API (issue 11 item 3): a researcher's grants, their files and link state, a
fresh link with its manifest, and the catalogue, anonymous."""

# ruff: noqa: F811  (the local_weights fixture imported from tests.releases is a parameter)

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.core import mail
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from access.models import Grant
from access.services import reviews
from tests.openapi import component_validator
from tests.releases import local_weights, stored_file  # noqa: F401 (a fixture)
from tests.tokens import api_token
from weights import tokens
from weights.models import Artifact, DownloadLink, LinkUsage
from weights.services.fresh_links import FRESH_LINK_LIMITED
from weights.services.links import GRANT_REVOKED, REPLACED_REASON, link_issue, link_resolve

pytestmark = pytest.mark.django_db

SHARD = b"\x01\x02" * 3000
PARAMS = b'{"dim": 4096}'
LINK_IN_MAIL = re.compile(r"http://[^/\s]+/d/([A-Za-z0-9_-]+)/")
ENVELOPE = {"detail", "code", "errors"}


def envelope(detail: str, code: str) -> dict:
    return {"detail": detail, "code": code, "errors": {}}


@pytest.fixture
def files(releases, license_v1, local_weights):
    release = releases["llama-7b"]
    release.parameter_count = 6_738_415_616
    release.license = license_v1
    release.save()
    return [
        stored_file(release, "7B/consolidated.00.pth", SHARD, scratch=local_weights),
        stored_file(release, "7B/params.json", PARAMS, scratch=local_weights),
        stored_file(release, "config.json", b"{}", variant="transformers", scratch=local_weights),
    ]


@pytest.fixture
def grant(files, alice, reviewer, make_submitted, releases, django_capture_on_commit_callbacks):
    application = make_submitted(alice, slugs=("llama-7b", "llama-13b"))
    with django_capture_on_commit_callbacks(execute=True):
        [grant] = reviews.application_approve(
            application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
        )
    return grant


def bearer(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token(user)}")
    return client


def emailed_token() -> str:
    (message,) = [m for m in mail.outbox if "download link" in m.subject]
    return LINK_IN_MAIL.findall(message.body)[0]


# --- grants_list / grant_retrieve ----------------------------------------------------------


def test_a_researcher_lists_grants_with_files_and_link_state_never_a_token(alice, grant):
    token = emailed_token()
    link = DownloadLink.objects.get(grant=grant)
    shard = Artifact.objects.get(path="7B/consolidated.00.pth")
    LinkUsage.objects.filter(link=link, artifact=shard).update(bytes_charged=1000)

    response = bearer(alice).get("/api/grants/")
    assert response.status_code == 200
    assert (
        token not in response.content.decode() and link.token_hash not in response.content.decode()
    )
    (body,) = response.json()
    assert body["id"] == grant.pk
    assert body["release"] == {"slug": "llama-7b", "name": "LLaMA 7B"}
    assert (body["license_version"], body["active"], body["revoked_at"]) == ("1", True, None)
    assert body["files"] == [
        {
            "path": "7B/consolidated.00.pth",
            "variant": "original",
            "size": 6000,
            "sha256": shard.sha256,
        },
        {
            "path": "7B/params.json",
            "variant": "original",
            "size": len(PARAMS),
            "sha256": Artifact.objects.get(path="7B/params.json").sha256,
        },
        {
            "path": "config.json",
            "variant": "transformers",
            "size": 2,
            "sha256": Artifact.objects.get(path="config.json").sha256,
        },
    ]
    state = body["link"]
    assert state["hint"] == token[:6] and state["state"] == "live"
    assert (state["budget_copies"], state["revoked_at"], state["revoke_reason"]) == (5, None, "")
    assert state["emailed_at"] is not None
    assert state["files"] == [
        {
            "path": "7B/consolidated.00.pth",
            "variant": "original",
            "remaining_bytes": 5 * 6000 - 1000,
        },
        {"path": "7B/params.json", "variant": "original", "remaining_bytes": 5 * len(PARAMS)},
        {"path": "config.json", "variant": "transformers", "remaining_bytes": 10},
    ]
    assert bearer(alice).get(f"/api/grants/{grant.pk}/").json() == body


def test_listing_grants_costs_the_same_queries_for_one_grant_or_many(
    alice, reviewer, grant, releases, local_weights
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    api = bearer(alice)
    with CaptureQueriesContext(connection) as one:
        assert len(api.get("/api/grants/").json()) == 1
    stored_file(releases["llama-13b"], "13B/params.json", PARAMS, scratch=local_weights)
    second = Grant.objects.create(
        user=alice,
        release=releases["llama-13b"],
        application=grant.application,
        license_version=grant.license_version,
        granted_by=reviewer,
    )
    link_issue(grant=second)
    api.post(f"/api/grants/{grant.pk}/links/")  # a second link on the first grant
    with CaptureQueriesContext(connection) as two:
        assert len(api.get("/api/grants/").json()) == 2
    assert len(two.captured_queries) == len(one.captured_queries)


def revoke(grant, reviewer, capture) -> None:
    with capture(execute=True):  # the grant's links are closed after commit
        reviews.grant_revoke(grant=grant, reviewer=reviewer, reason="Shared the weights.")


def test_expired_and_revoked_links_say_so_and_have_nothing_left(
    alice, reviewer, grant, django_capture_on_commit_callbacks
):
    DownloadLink.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    state = bearer(alice).get(f"/api/grants/{grant.pk}/").json()["link"]
    assert state["state"] == "expired"
    assert {f["remaining_bytes"] for f in state["files"]} == {0}

    revoke(grant, reviewer, django_capture_on_commit_callbacks)
    body = bearer(alice).get(f"/api/grants/{grant.pk}/").json()
    assert (body["active"], body["revoke_reason"]) == (False, "Shared the weights.")
    assert body["link"]["state"] == "revoked" and body["link"]["revoked_at"] is not None


def test_grants_are_scoped_to_their_holder(alice, charlie, grant):
    assert bearer(charlie).get("/api/grants/").json() == []
    for method, path in [
        ("get", f"/api/grants/{grant.pk}/"),
        ("post", f"/api/grants/{grant.pk}/links/"),
        ("get", "/api/grants/999999/"),
    ]:
        response = getattr(bearer(charlie), method)(path)
        assert (response.status_code, response.json()) == (
            404,
            envelope("No such grant.", "not_found"),
        )
    assert DownloadLink.objects.filter(grant=grant).count() == 1
    anonymous = APIClient().get("/api/grants/")
    assert anonymous.status_code == 401 and set(anonymous.json()) == ENVELOPE


# --- grant_links_create ------------------------------------------------------------------


def test_a_fresh_link_is_returned_once_with_its_manifest(alice, grant, client):
    old = emailed_token()
    response = bearer(alice).post(f"/api/grants/{grant.pk}/links/")
    assert response.status_code == 201, response.content
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    token = re.fullmatch(r"http://testserver/d/([A-Za-z0-9_-]+)/", body["url"])[1]
    assert body["manifest_url"] == f"http://testserver/d/{token}/manifest.json"
    assert body["download_script_url"] == f"http://testserver/d/{token}/download.sh"
    assert body["llama_stack_url"] == f"http://testserver/d/{token}/llama-stack.json"
    assert body["cli_command"] == f'python -m weights.download "{body["url"]}"'
    assert (body["hint"], body["budget_copies"]) == (token[:6], 5)
    link = link_resolve(token)
    assert link.grant == grant and body["expires_at"] == link.expires_at.isoformat().replace(
        "+00:00", "Z"
    )
    old_link = DownloadLink.objects.get(token_hash=tokens.token_hash(old))
    assert (old_link.revoked_at is not None, old_link.revoke_reason) == (True, REPLACED_REASON)

    # The manifest in the response is what the link's manifest.json answers, field for field.
    live = client.get(f"/d/{token}/manifest.json")
    assert live.status_code == 200
    assert body["manifest"] == live.json()
    assert [f["path"] for f in live.json()["files"]] == ["7B/consolidated.00.pth", "7B/params.json"]

    # Shown once: the grant lists its hint, never the token.
    listing = bearer(alice).get("/api/grants/").content.decode()
    assert token not in listing and token[:6] in listing


def test_the_live_manifest_validates_against_the_schema_component(alice, grant, client):
    schema = client.get("/api/schema/", {"format": "json"}).json()
    component = schema["components"]["schemas"]["Manifest"]
    created = bearer(alice).post(f"/api/grants/{grant.pk}/links/").json()
    live = client.get(created["manifest_url"].removeprefix("http://testserver")).json()
    component_validator(schema, "Manifest").validate(live)
    # Nothing undocumented either: every key of the body is a property of the component.
    assert set(live) == set(component["properties"])
    file_component = schema["components"]["schemas"]["ManifestFile"]
    assert all(set(f) == set(file_component["properties"]) for f in live["files"])
    operation = schema["paths"]["/api/grants/{id}/links/"]["post"]
    issued = operation["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
    issued_component = schema["components"]["schemas"][issued.rsplit("/", 1)[1]]
    assert issued_component["properties"]["manifest"]["allOf"][0]["$ref"].endswith("/Manifest")


def test_a_revoked_grant_gets_no_link(alice, reviewer, grant, django_capture_on_commit_callbacks):
    revoke(grant, reviewer, django_capture_on_commit_callbacks)
    response = bearer(alice).post(f"/api/grants/{grant.pk}/links/")
    assert response.status_code == 409
    assert response.json() == envelope(GRANT_REVOKED.format(release="LLaMA 7B"), "grant_revoked")
    assert not DownloadLink.objects.filter(grant=grant, revoked_at__isnull=True).exists()


@override_settings(WEIGHTS_FRESH_LINK_RATE="3/h")
def test_the_fresh_link_allowance_is_one_budget_for_the_page_and_the_api(alice, grant):
    page = Client()
    page.force_login(alice)
    api = bearer(alice)
    page_url = reverse("weights:fresh_link", args=[grant.pk])
    api_url = f"/api/grants/{grant.pk}/links/"
    assert page.post(page_url).status_code == 302
    assert api.post(api_url).status_code == 201
    assert page.post(page_url).status_code == 302
    live = DownloadLink.objects.get(grant=grant, revoked_at__isnull=True)

    refused = api.post(api_url)
    assert refused.status_code == 429
    assert refused.json() == envelope(FRESH_LINK_LIMITED, "throttled")
    assert 0 < int(refused["Retry-After"]) <= 3600
    assert FRESH_LINK_LIMITED in page.post(page_url, follow=True).content.decode()
    assert DownloadLink.objects.get(grant=grant, revoked_at__isnull=True) == live
    assert DownloadLink.objects.filter(grant=grant).count() == 4  # emailed + 3 fresh


# --- the catalogue, anonymous --------------------------------------------------------------


def test_anyone_reads_the_catalogue_and_a_release_with_its_files(files, license_v1):
    anonymous = APIClient()
    listing = anonymous.get("/api/releases/")
    assert listing.status_code == 200
    seven = listing.json()[0]
    assert seven == {
        "slug": "llama-7b",
        "name": "LLaMA 7B",
        "family": "llama",
        "parameter_count": 6_738_415_616,
        "license": {"title": license_v1.name, "version": "1"},
        "total_size": 6000 + len(PARAMS),  # what a link serves: the original layout
        "file_count": 2,
        "published_at": None,
    }
    assert listing.json()[1]["total_size"] == 0 and listing.json()[1]["license"] is None

    detail = anonymous.get("/api/releases/llama-7b/")
    assert detail.status_code == 200
    body = detail.json()
    assert {k: body[k] for k in seven} == seven
    assert [(f["path"], f["variant"], f["size"]) for f in body["files"]] == [
        ("7B/consolidated.00.pth", "original", 6000),
        ("7B/params.json", "original", len(PARAMS)),
        ("config.json", "transformers", 2),
    ]
    assert body["files"][0]["sha256"] == files[0].sha256

    missing = anonymous.get("/api/releases/gpt-5/")
    assert missing.status_code == 404
    assert missing.json() == envelope(
        "No release has the slug gpt-5. The releases are listed at /api/releases/.", "not_found"
    )
