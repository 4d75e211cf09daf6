"""The whole journey over HTTP alone, driven by the published schema (issue 11 item 3).

A researcher and a reviewer, each with nothing but the portal's URL, a password (and the
reviewer an authenticator): they sign in by session only to mint a token, then do
everything else with `Authorization: Bearer <token>`, finding each endpoint by its
operationId in /api/schema/. The researcher ends with a file's bytes from the link the API
issued, checked against the manifest's SHA-256. Real HTTP (requests) against a live server.
"""

# ruff: noqa: F811  (the local_weights fixture imported from tests.releases is a parameter)

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
from django.urls import reverse

from tests.conftest import FIELDS
from tests.openapi import Operation, component_validator, operations
from tests.releases import local_weights, stored_file  # noqa: F401 (a fixture)
from tests.twofactor import activate_totp, current_totp_code
from weights.models import DownloadEvent, DownloadLink

pytestmark = pytest.mark.django_db(transaction=True)

SHARD = bytes(range(256)) * 257  # 65,792 bytes: several chunks on the wire


class Portal:
    """The API as a client program sees it: a base URL and the schema's operations."""

    def __init__(self, base: str) -> None:
        self.base = base
        response = requests.get(f"{base}/api/schema/", params={"format": "json"}, timeout=10)
        assert response.status_code == 200, response.text[:500]
        self.schema = response.json()
        self.operations = operations(self.schema)

    def operation(self, operation_id: str) -> Operation:
        return self.operations[operation_id]

    def call(
        self, http: requests.Session, operation_id: str, *, expect: int, **params: object
    ) -> requests.Response:
        body = params.pop("json", None)
        query = params.pop("query", None)
        operation = self.operation(operation_id)
        response = http.request(
            operation.method,
            self.base + operation.url(**params),
            json=body,
            params=query,
            timeout=10,
        )
        assert response.status_code == expect, (operation_id, response.text[:1000])
        return response

    def sign_in(
        self, email: str, password: str, totp_secret: str | None = None
    ) -> requests.Session:
        """A browser session: allauth's login form (and its authenticator step)."""
        browser = requests.Session()
        login = self.base + reverse("account_login")
        browser.get(login, timeout=10)
        response = browser.post(
            login,
            data={
                "login": email,
                "password": password,
                "csrfmiddlewaretoken": browser.cookies["csrftoken"],
            },
            headers={"Referer": login},
            allow_redirects=False,
            timeout=10,
        )
        assert response.status_code == 302, response.text[:1000]
        if totp_secret is not None:
            assert response.headers["Location"] == reverse("mfa_authenticate")
            response = browser.post(
                self.base + reverse("mfa_authenticate"),
                data={
                    "code": current_totp_code(totp_secret),
                    "csrfmiddlewaretoken": browser.cookies["csrftoken"],
                },
                allow_redirects=False,
                timeout=10,
            )
            assert response.status_code == 302, response.text[:1000]
        return browser

    def mint_token(self, browser: requests.Session, name: str) -> requests.Session:
        """tokens_create from the signed-in session; the API client that holds the token."""
        browser.headers["X-CSRFToken"] = browser.cookies["csrftoken"]
        created = self.call(browser, "tokens_create", expect=201, json={"name": name}).json()
        assert created["token"].startswith("lap_") and created["name"] == name
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {created['token']}"
        return api


@pytest.fixture
def shard(releases, license_v1, local_weights):
    return stored_file(releases["llama-7b"], "7B/consolidated.00.pth", SHARD, scratch=local_weights)


def wait_for_download_event(link_id: int) -> DownloadEvent:
    """A stream writes its event when the server closes it, just after the last byte."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        event = DownloadEvent.objects.filter(link_id=link_id).first()
        if event is not None:
            return event
        time.sleep(0.05)
    raise AssertionError("no download event was recorded")


def test_the_researcher_and_reviewer_journey_over_http_alone(
    live_server, alice, reviewer, password, shard
):
    portal = Portal(live_server.url)

    # The researcher: a session only to mint a token, then the token for everything.
    researcher = portal.mint_token(portal.sign_in(alice.email, password), "laptop")
    license_body = portal.call(researcher, "license_retrieve", expect=200).json()
    assert (license_body["version"], license_body["accepted"]) == ("1", False)
    portal.call(researcher, "license_accept", expect=200, json={"accept": True, "version": "1"})
    before_submission = datetime.now(UTC) - timedelta(seconds=1)
    draft = portal.call(
        researcher, "applications_create", expect=201, json={**FIELDS, "releases": ["llama-7b"]}
    ).json()
    submitted = portal.call(
        researcher,
        "application_submit",
        expect=200,
        id=draft["id"],
        json={"accept_license": True},
    ).json()
    assert submitted["status"] == "submitted"

    # The reviewer: signed in with the authenticator code, so the token reviews.
    secret = activate_totp(reviewer)
    review = portal.mint_token(portal.sign_in(reviewer.email, password, secret), "triage")
    poll = {
        "updated_since": before_submission.isoformat(),
        "ordering": "updated_at",
        "release": "llama-7b",
    }
    queue = portal.call(review, "review_applications_list", expect=200, query=poll).json()
    assert [row["id"] for row in queue["results"]] == [draft["id"]]
    later = {**poll, "updated_since": queue["results"][0]["updated_at"]}
    # Inclusive: the application seen at that instant comes again, and only it.
    again = portal.call(review, "review_applications_list", expect=200, query=later).json()
    assert [row["id"] for row in again["results"]] == [draft["id"]]
    approved = portal.call(
        review,
        "review_application_approve",
        expect=200,
        id=draft["id"],
        json={"releases": ["llama-7b"]},
    ).json()
    assert approved["status"] == "approved"

    # The researcher downloads: grant, fresh link, manifest, one file.
    (grant,) = portal.call(researcher, "grants_list", expect=200).json()
    assert grant["release"]["slug"] == "llama-7b"
    assert grant["files"] == [
        {"path": shard.path, "variant": "original", "size": len(SHARD), "sha256": shard.sha256}
    ]
    issued = portal.call(researcher, "grant_links_create", expect=201, id=grant["id"]).json()
    assert issued["url"].startswith(live_server.url + "/d/")

    anyone = requests.Session()  # the link is the credential: no token, no cookie
    manifest = anyone.get(issued["manifest_url"], timeout=10)
    assert manifest.status_code == 200
    assert manifest.json() == issued["manifest"]
    component_validator(portal.schema, "Manifest").validate(manifest.json())
    (entry,) = manifest.json()["files"]
    assert entry["url"] == issued["url"] + shard.path

    download = anyone.get(entry["url"], timeout=10)
    assert download.status_code == 200
    assert download.content == SHARD
    assert hashlib.sha256(download.content).hexdigest() == entry["sha256"] == shard.sha256
    link = DownloadLink.objects.get(grant_id=grant["id"], revoked_at__isnull=True)
    assert link.token_hint == issued["hint"]
    event = wait_for_download_event(link.pk)
    assert (event.outcome, event.bytes) == ("served", len(SHARD))

    # What is left of the budget shows on the grant, for the link the API issued.
    after = portal.call(researcher, "grant_retrieve", expect=200, id=grant["id"]).json()
    assert after["link"]["hint"] == issued["hint"]
    assert after["link"]["files"][0]["remaining_bytes"] == 4 * len(SHARD)


def test_a_token_cannot_mint_tokens_and_the_session_needs_csrf(live_server, alice, password):
    portal = Portal(live_server.url)
    browser = portal.sign_in(alice.email, password)
    refused = portal.call(browser, "tokens_create", expect=403, json={"name": "no csrf"})
    assert refused.json()["code"] == "permission_denied"
    assert refused.json()["detail"].startswith("CSRF Failed")
    api = portal.mint_token(browser, "first")
    again = portal.call(api, "tokens_create", expect=403, json={"name": "second"})
    assert again.json()["code"] == "session_required"
    (listed,) = portal.call(api, "tokens_list", expect=200).json()
    assert listed["name"] == "first" and "token" not in listed
    portal.call(api, "token_revoke", expect=204, key=listed["key"])
    gone = portal.call(api, "tokens_list", expect=401).json()
    assert gone == {"detail": "Invalid token.", "code": "authentication_failed", "errors": {}}
