"""Webhooks from the operator's side (the admin) and from the weights app (flagged links)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from access import webhook_validators
from access.models import WebhookDelivery, WebhookEndpoint, WebhookEventType
from access.services import reviews, webhooks
from tests.access.webhook_receiver import documented_verify, receiving
from tests.factories import UserFactory
from tests.twofactor import login_with_2fa
from weights.models import DownloadEvent, DownloadLink
from weights.services import events, links, maintenance

pytestmark = pytest.mark.django_db

Status = WebhookDelivery.Status
ADD = reverse("admin:access_webhookendpoint_add")
ENDPOINTS = reverse("admin:access_webhookendpoint_changelist")
DELIVERIES = reverse("admin:access_webhookdelivery_changelist")


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def operator_client(client, password):
    operator = UserFactory(
        username="olga", email="olga@portal.example.org", is_staff=True, is_superuser=True
    )
    return login_with_2fa(client, operator, password)


def form_for(url: str, **fields) -> dict:
    return {
        "url": url,
        "description": "Lab CRM",
        "event_types": ["application.submitted", "application.approved"],
        "is_active": "on",
        **fields,
    }


# --- registering endpoints --------------------------------------------------------------


def test_an_operator_registers_an_endpoint_and_sees_its_secret(operator_client):
    response = operator_client.post(ADD, form_for("https://crm.example.org/hooks/portal"))
    endpoint = WebhookEndpoint.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse(
        "admin:access_webhookendpoint_change", args=[endpoint.pk]
    )
    assert endpoint.url == "https://crm.example.org/hooks/portal" and endpoint.is_active
    assert endpoint.event_types == ["application.submitted", "application.approved"]
    assert endpoint.secret.startswith("whsec_") and len(endpoint.secret) >= 40
    page = operator_client.get(response["Location"]).content.decode()
    assert endpoint.secret in page and "No deliveries yet." in page
    other = WebhookEndpoint.objects.create(
        url="https://x.example.org/", event_types=["grant.revoked"]
    )
    assert other.secret != endpoint.secret


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.org/hook", webhook_validators.WRONG_SCHEME),
        ("javascript:alert(1)", "Enter a valid URL."),
        ("file:///etc/passwd", "Enter a valid URL."),
        (
            "http://example.org/ho\x07ok",
            webhook_validators.CONTROL_CHARACTER.format(char="U+0007 CONTROL CHARACTER"),
        ),
        (
            "https://example.org/a\u202eb",
            webhook_validators.CONTROL_CHARACTER.format(char="U+202E RIGHT-TO-LEFT OVERRIDE"),
        ),
        ("https://example.org/a\tb", "Enter a valid URL."),
        ("https://example.org/a b", "Enter a valid URL."),
        (
            "https://exämple.org/hook",
            webhook_validators.NOT_ASCII.format(char="U+00E4 LATIN SMALL LETTER A WITH DIAERESIS"),
        ),
        ("https://user:secret@example.org/hook", webhook_validators.CREDENTIALS),
    ],
)
def test_a_url_that_cannot_be_posted_to_is_a_form_error_and_writes_nothing(
    operator_client, url, message
):
    response = operator_client.post(ADD, form_for(url))
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["url"] == [message]
    assert not WebhookEndpoint.objects.exists()


def test_an_endpoint_needs_known_event_types(operator_client):
    for event_types in ([], ["application.created"], ["ping"]):
        response = operator_client.post(
            ADD, form_for("https://crm.example.org/", event_types=event_types)
        )
        assert response.status_code == 200
        assert response.context["adminform"].form.errors["event_types"]
    assert not WebhookEndpoint.objects.exists()


def test_reviewers_do_not_see_endpoints_or_their_secrets(reviewer_client):
    endpoint = WebhookEndpoint.objects.create(
        url="https://x.example.org/", event_types=["grant.revoked"]
    )
    assert reviewer_client.get(ENDPOINTS).status_code == 403
    change = reverse("admin:access_webhookendpoint_change", args=[endpoint.pk])
    assert endpoint.secret not in reviewer_client.get(change).content.decode()
    assert reviewer_client.get(DELIVERIES).status_code == 403


# --- the test event, rotation, the delivery log and Retry --------------------------------


def test_the_test_event_reaches_the_receiver_through_the_outbox(
    operator_client, django_capture_on_commit_callbacks
):
    with receiving() as receiver:
        endpoint = WebhookEndpoint.objects.create(
            url=receiver.url(), event_types=["link.flagged"], description="Slack relay"
        )
        asleep = WebhookEndpoint.objects.create(
            url=receiver.url("/asleep"), event_types=["link.flagged"], is_active=False
        )
        with django_capture_on_commit_callbacks(execute=True):
            response = operator_client.post(
                ENDPOINTS,
                {"action": "send_test_event", "_selected_action": [endpoint.pk, asleep.pk]},
                follow=True,
            )
    notes = [str(m) for m in response.context["messages"]]
    assert "Test event queued for 1 endpoint(s); see the delivery log." in notes
    assert f"Not sent to 1 inactive endpoint(s): {asleep}" in notes
    (ping,) = receiver.received
    assert ping.path == "/hook" and ping.headers["X-Portal-Event"] == "ping"
    assert documented_verify()(endpoint.secret, ping.body, ping.headers["X-Portal-Signature"])
    assert ping.payload["data"]["endpoint_id"] == endpoint.pk
    row = WebhookDelivery.objects.get()
    assert row.event_type == "ping" and row.status == Status.DELIVERED
    assert ping.payload["id"] == str(row.uuid)
    page = operator_client.get(reverse("admin:access_webhookendpoint_change", args=[endpoint.pk]))
    assert "Delivered" in page.content.decode()


def test_a_rotated_secret_signs_next_to_the_old_one_for_a_day(
    operator_client, django_capture_on_commit_callbacks
):
    with receiving() as receiver:
        endpoint = WebhookEndpoint.objects.create(url=receiver.url(), event_types=["grant.revoked"])
        old = endpoint.secret
        response = operator_client.post(
            ENDPOINTS, {"action": "rotate_secret", "_selected_action": [endpoint.pk]}
        )
        assert response.status_code == 302
        endpoint.refresh_from_db()
        assert endpoint.secret != old and endpoint.secret.startswith("whsec_")
        with django_capture_on_commit_callbacks(execute=True):
            webhooks.ping_send(endpoint=endpoint)
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
            previous_secret_expires_at=timezone.now() - timedelta(seconds=1)
        )
        endpoint.refresh_from_db()
        with django_capture_on_commit_callbacks(execute=True):
            webhooks.ping_send(endpoint=endpoint)
    verify = documented_verify()
    during, after = receiver.received
    for secret in (old, endpoint.secret):
        assert verify(secret, during.body, during.headers["X-Portal-Signature"])
    assert verify(endpoint.secret, after.body, after.headers["X-Portal-Signature"])
    assert not verify(old, after.body, after.headers["X-Portal-Signature"])


def test_operators_filter_the_log_and_retry_a_failed_delivery(
    operator_client, alice, make_submitted, settings, django_capture_on_commit_callbacks
):
    settings.PORTAL_WEBHOOK_MAX_ATTEMPTS = 1
    with receiving(status=503, answer=b"maintenance") as receiver:
        endpoint = WebhookEndpoint.objects.create(
            url=receiver.url(), event_types=["application.submitted"]
        )
        with django_capture_on_commit_callbacks(execute=True):
            make_submitted(alice)
        row = WebhookDelivery.objects.get()
        assert row.status == Status.FAILED

        failed = operator_client.get(DELIVERIES, {"status__exact": "failed"})
        assert [d.pk for d in failed.context["cl"].result_list] == [row.pk]
        assert (
            not operator_client.get(DELIVERIES, {"status__exact": "delivered"})
            .context["cl"]
            .result_list
        )
        by_event = operator_client.get(DELIVERIES, {"event_type": "application.submitted"})
        assert [d.pk for d in by_event.context["cl"].result_list] == [row.pk]
        by_endpoint = operator_client.get(DELIVERIES, {"endpoint__id__exact": endpoint.pk})
        assert [d.pk for d in by_endpoint.context["cl"].result_list] == [row.pk]
        by_id = operator_client.get(DELIVERIES, {"q": str(row.uuid)})
        assert [d.pk for d in by_id.context["cl"].result_list] == [row.pk]
        detail = operator_client.get(
            reverse("admin:access_webhookdelivery_change", args=[row.pk])
        ).content.decode()
        assert "maintenance" in detail and "503" in detail and str(row.uuid) in detail

        receiver.status = 200
        with django_capture_on_commit_callbacks(execute=True):
            response = operator_client.post(
                DELIVERIES, {"action": "retry_selected", "_selected_action": [row.pk]}
            )
        assert response.status_code == 302
        with django_capture_on_commit_callbacks(execute=True):
            operator_client.post(
                DELIVERIES, {"action": "retry_selected", "_selected_action": [row.pk]}
            )
    row.refresh_from_db()
    assert row.status == Status.DELIVERED and row.attempts == 2 and row.failed_at is None
    assert [a.response_status for a in row.attempt_log.all()] == [503, 200]
    assert len(receiver.received) == 2  # the second Retry left the delivered row alone


def test_staff_who_may_only_view_the_log_cannot_retry(reviewer, password, client):
    from django.contrib.auth.models import Permission

    reviewer.user_permissions.add(Permission.objects.get(codename="view_webhookdelivery"))
    viewer = login_with_2fa(client, reviewer, password)
    WebhookEndpoint.objects.create(url="https://x.example.org/", event_types=["grant.revoked"])
    row = webhooks.ping_send(endpoint=WebhookEndpoint.objects.get())
    WebhookDelivery.objects.filter(pk=row.pk).update(status=Status.FAILED)
    page = viewer.get(DELIVERIES)
    assert page.status_code == 200 and "retry_selected" not in page.content.decode()
    viewer.post(DELIVERIES, {"action": "retry_selected", "_selected_action": [row.pk]})
    row.refresh_from_db()
    assert row.status == Status.FAILED and row.attempts == 0


# --- flagged download links (weights) -----------------------------------------------------


@pytest.fixture
def issued(alice, reviewer, make_submitted, releases):
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = reviews.application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    return links.link_issue(grant=grant)


def use_from(link: DownloadLink, addresses: list[str]) -> None:
    for address in addresses:
        events.download_event_record(
            link=link,
            user=link.grant.user,
            artifact=None,
            ip_address=address,
            user_agent="Wget/1.21.3",
            range_header="",
            nbytes=1,
            status_code=206,
            outcome="partial",
        )


def test_a_link_flagged_by_the_event_journal_is_an_event_without_its_token(issued, settings, alice):
    settings.WEIGHTS_LINK_MAX_IPS = 2
    WebhookEndpoint.objects.create(url="https://x.example.org/", event_types=["link.flagged"])
    link = issued.link
    use_from(link, ["192.0.2.1", "192.0.2.2", "192.0.2.1"])
    assert not WebhookDelivery.objects.exists()
    use_from(link, ["192.0.2.3"])  # WEIGHTS_EVENT_BATCH is 1: inserted, and flagged, here
    link.refresh_from_db()
    (row,) = WebhookDelivery.objects.all()
    assert row.event_type == "link.flagged"
    assert row.data == {
        "link_id": link.pk,
        "token_hint": link.token_hint,
        "grant_id": link.grant_id,
        "application_id": link.grant.application_id,
        "release": "llama-7b",
        "user": {"id": alice.pk, "email": alice.email},
        "flagged_at": link.flagged_at.isoformat(),
        "max_addresses": 2,
        "admin_url": f"{settings.SITE_URL}/admin/weights/downloadlink/{link.pk}/change/",
    }
    body = webhooks.delivery_body(row)
    assert issued.token.encode() not in body and link.token_hash.encode() not in body
    use_from(link, ["192.0.2.4"])  # flagged already: no second event
    assert WebhookDelivery.objects.count() == 1


def test_the_periodic_recheck_emits_once_per_flag_raised(issued, settings):
    settings.WEIGHTS_LINK_MAX_IPS = 1
    WebhookEndpoint.objects.create(url="https://x.example.org/", event_types=["link.flagged"])
    link = issued.link
    DownloadEvent.objects.bulk_create(  # as a batch that raced past the journal's check
        DownloadEvent(
            link=link, user=link.grant.user, ip_address=address, status_code=206, outcome="partial"
        )
        for address in ["192.0.2.1", "192.0.2.2"]
    )
    assert maintenance.links_flag_shared() == 1
    assert maintenance.links_flag_shared() == 0
    assert WebhookDelivery.objects.filter(event_type="link.flagged").count() == 1
    DownloadLink.objects.filter(pk=link.pk).update(flagged_at=None)  # a reviewer clears it
    assert maintenance.links_flag_shared() == 1
    flags = WebhookDelivery.objects.filter(event_type="link.flagged").order_by("pk")
    assert [row.data["link_id"] for row in flags] == [link.pk, link.pk]
    assert flags[0].data["flagged_at"] != flags[1].data["flagged_at"]


def test_a_repeated_flag_time_never_duplicates_an_event(issued):
    endpoint = WebhookEndpoint.objects.create(
        url="https://x.example.org/", event_types=["link.flagged"]
    )
    link = issued.link
    now = timezone.now()
    DownloadLink.objects.filter(pk=link.pk).update(flagged_at=now)
    assert len(webhooks.links_flagged_emit(link_ids=[link.pk], flagged_at=now)) == 1
    assert webhooks.links_flagged_emit(link_ids=[link.pk], flagged_at=now) == []
    assert webhooks.links_flagged_emit(link_ids=[link.pk], flagged_at=now - timedelta(1)) == []
    assert WebhookDelivery.objects.filter(endpoint=endpoint).count() == 1


def test_every_event_type_can_be_subscribed_in_the_admin(operator_client):
    response = operator_client.get(ADD)
    choices = dict(response.context["adminform"].form.fields["event_types"].choices)
    assert list(choices) == list(WebhookEventType.values)
    assert "ping" not in choices
