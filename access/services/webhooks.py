"""Webhooks: events POSTed, signed, to the endpoints operators register (docs/webhooks.md).

An event is one WebhookDelivery row per subscribed, active endpoint, written in the
transaction of the change that causes it and enqueued after commit: a rolled-back change
sends nothing. Delivery claims the row with a conditional UPDATE (access.services.outbox),
POSTs it with urllib and writes a WebhookAttempt. A 2xx delivers it; anything else is
tried again after an exponential backoff (next_attempt_at, picked up by the periodic
sweep) and marked failed after PORTAL_WEBHOOK_MAX_ATTEMPTS.

Payloads carry ids, emails, release slugs and admin links; never a download token, an
API token or a secret.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from access import webhook_signing
from access.models import (
    WEBHOOK_PING,
    Application,
    ApplicationEvent,
    Grant,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEventType,
    new_webhook_secret,
)
from access.services import outbox
from access.webhook_validators import WEBHOOK_SCHEMES

logger = logging.getLogger(__name__)

Action = ApplicationEvent.Action
EventType = WebhookEventType
Delivery = WebhookDelivery.Status

# The one place that says which application transitions are webhook events. Drafts
# being created and questions being asked are not (yet) events receivers can subscribe to.
EVENT_FOR_ACTION = {
    Action.SUBMITTED: EventType.APPLICATION_SUBMITTED,
    Action.ANSWERED: EventType.APPLICATION_ANSWERED,
    Action.APPROVED: EventType.APPLICATION_APPROVED,
    Action.REJECTED: EventType.APPLICATION_REJECTED,
    Action.WITHDRAWN: EventType.APPLICATION_WITHDRAWN,
    Action.REVOKED: EventType.APPLICATION_REVOKED,
}
RESPONSE_SNIPPET_BYTES = 1000
ERROR_CHARS = 2000
MAX_BACKOFF = timedelta(hours=6)
SECRET_GRACE = timedelta(hours=24)
SWEEP_BATCH = 200
USER_AGENT = "llama-access-portal-webhooks/1"


def _now() -> datetime:
    return timezone.now()


def admin_url(viewname: str, pk: int) -> str:
    return settings.SITE_URL + reverse(viewname, args=[pk])


def _person(user: AbstractBaseUser) -> dict[str, Any]:
    return {"id": user.pk, "email": user.email}


# --- writing events -------------------------------------------------------------------


def _subscribed(event_type: str) -> list[WebhookEndpoint]:
    # Few endpoints, and JSON containment is not portable to SQLite: filter here.
    return [
        e for e in WebhookEndpoint.objects.filter(is_active=True) if e.subscribes_to(event_type)
    ]


def _write(
    endpoints: Iterable[WebhookEndpoint],
    event_type: str,
    data: dict[str, Any],
    *,
    dedupe_key: str | None = None,
) -> list[WebhookDelivery]:
    """One outbox row per endpoint in the caller's transaction, enqueued after commit."""
    occurred = _now()
    written = []
    for endpoint in endpoints:
        row = WebhookDelivery(
            endpoint=endpoint,
            event_type=event_type,
            data=data,
            dedupe_key=dedupe_key,
            created_at=occurred,
            next_attempt_at=occurred,
        )
        try:
            with transaction.atomic():
                row.save()
        except IntegrityError:
            if (
                dedupe_key
                and WebhookDelivery.objects.filter(
                    endpoint=endpoint, dedupe_key=dedupe_key
                ).exists()
            ):
                continue
            raise
        transaction.on_commit(partial(_enqueue, row.pk))
        written.append(row)
    return written


def webhook_emit(
    event_type: str, data: Callable[[], dict[str, Any]], *, dedupe_key: str | None = None
) -> list[WebhookDelivery]:
    """Write `event_type` for every active endpoint subscribed to it; `data` is only built
    when there is one."""
    endpoints = _subscribed(event_type)
    return _write(endpoints, event_type, data(), dedupe_key=dedupe_key) if endpoints else []


def _enqueue(delivery_id: int) -> None:
    from access.tasks import deliver_webhook

    outbox.enqueue(deliver_webhook, delivery_id)


def application_event_emit(event: ApplicationEvent) -> list[WebhookDelivery]:
    """The webhook event of an application transition, if it is one."""
    event_type = EVENT_FOR_ACTION.get(event.action)
    if event_type is None:
        return []
    if event.action == Action.WITHDRAWN and event.from_status == Application.Status.DRAFT:
        return []  # receivers never heard of drafts
    return webhook_emit(event_type, partial(_application_data, event))


def _application_data(event: ApplicationEvent) -> dict[str, Any]:
    application = event.application
    data = {
        "application_id": application.pk,
        "application_event_id": event.pk,
        "status": event.to_status,
        "previous_status": event.from_status,
        "actor_id": event.actor_id,
        # Set when an approval policy decided: its name and the rule that fired.
        "actor_label": event.actor_label,
        "policy_rule_id": event.policy_rule_id,
        "applicant": _person(application.applicant),
        "requested_releases": sorted(application.requested_releases.values_list("slug", flat=True)),
        "releases": list(event.releases),
        "admin_url": admin_url("admin:access_application_change", application.pk),
    }
    if event.action == Action.APPROVED:
        granted = application.grants.filter(
            revoked_at__isnull=True, release__slug__in=event.releases
        ).order_by("release__slug")
        data["grants"] = [
            {"id": pk, "release": slug} for pk, slug in granted.values_list("pk", "release__slug")
        ]
    return data


def grant_revoked_emit(grant: Grant) -> list[WebhookDelivery]:
    def data() -> dict[str, Any]:
        return {
            "grant_id": grant.pk,
            "application_id": grant.application_id,
            "release": grant.release.slug,
            "user": _person(grant.user),
            "revoked_at": grant.revoked_at.isoformat(),
            "revoked_by_id": grant.revoked_by_id,
            "admin_url": admin_url("admin:access_grant_change", grant.pk),
        }

    return webhook_emit(EventType.GRANT_REVOKED, data)


def links_flagged_emit(*, link_ids: Iterable[int], flagged_at: datetime) -> list[WebhookDelivery]:
    """One event per link among `link_ids` that was flagged at `flagged_at`: those the
    caller's UPDATE flagged, not those flagged earlier (or by a concurrent check)."""
    from weights.models import DownloadLink

    endpoints = _subscribed(EventType.LINK_FLAGGED)
    if not endpoints:
        return []
    flagged = DownloadLink.objects.filter(
        pk__in=list(link_ids), flagged_at=flagged_at
    ).select_related("grant__user", "grant__release")
    written = []
    for link in flagged.order_by("pk"):
        data = {
            "link_id": link.pk,
            "token_hint": link.token_hint,
            "grant_id": link.grant_id,
            "application_id": link.grant.application_id,
            "release": link.grant.release.slug,
            "user": _person(link.grant.user),
            "flagged_at": flagged_at.isoformat(),
            "max_addresses": settings.WEIGHTS_LINK_MAX_IPS,
            "admin_url": admin_url("admin:weights_downloadlink_change", link.pk),
        }
        # A flag is cleared by a reviewer and may be raised again: one event per raising.
        key = f"link.flagged:{link.pk}:{flagged_at.isoformat()}"
        written += _write(endpoints, EventType.LINK_FLAGGED, data, dedupe_key=key)
    return written


def ping_send(*, endpoint: WebhookEndpoint) -> WebhookDelivery:
    """A test event for one endpoint, whatever it subscribes to, through the same outbox."""
    data = {
        "endpoint_id": endpoint.pk,
        "message": "Test event from the LLaMA access portal.",
        "admin_url": admin_url("admin:access_webhookendpoint_change", endpoint.pk),
    }
    (row,) = _write([endpoint], WEBHOOK_PING, data)
    return row


# --- delivering -----------------------------------------------------------------------


def delivery_body(delivery: WebhookDelivery) -> bytes:
    envelope = {
        "id": str(delivery.uuid),
        "type": delivery.event_type,
        "created_at": delivery.created_at.isoformat(),
        "data": delivery.data,
    }
    return json.dumps(envelope, separators=(",", ":")).encode("ascii")


def delivery_headers(delivery: WebhookDelivery, body: bytes, *, now: datetime) -> dict[str, str]:
    endpoint = delivery.endpoint
    signature = webhook_signing.sign(
        endpoint.secret,
        body,
        int(now.timestamp()),
        previous_secret=endpoint.previous_secret_at(now),
    )
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        webhook_signing.SIGNATURE_HEADER: signature,
        webhook_signing.EVENT_HEADER: delivery.event_type,
        webhook_signing.DELIVERY_HEADER: str(delivery.uuid),
    }


@dataclass(frozen=True)
class Response:
    status: int | None
    body: str
    error: str

    @property
    def is_success(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a delivery: following it would turn the POST into a
    GET whose 200 would count as delivered."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def _start_of(stream: Any) -> str:
    try:
        raw = stream.read(RESPONSE_SNIPPET_BYTES)
    except (OSError, http.client.HTTPException):
        return ""
    # PostgreSQL text cannot hold NUL.
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    return f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]


def http_post(url: str, body: bytes, headers: dict[str, str], *, timeout: float) -> Response:
    if urlsplit(url).scheme.lower() not in WEBHOOK_SCHEMES:  # a row changed behind the form
        return Response(status=None, body="", error="ValueError: not an http(s) URL")
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with _opener.open(request, timeout=timeout) as answer:
            return Response(status=answer.status, body=_start_of(answer), error="")
    except urllib.error.HTTPError as exc:
        with exc:
            return Response(status=exc.code, body=_start_of(exc), error="")
    except Exception as exc:  # refused, reset, timed out, unresolvable: all retried
        return Response(status=None, body="", error=_describe(exc))


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt: base, 2 × base, 4 × base, …"""
    base = settings.PORTAL_WEBHOOK_BACKOFF_BASE_SECONDS
    return min(timedelta(seconds=base * 2 ** min(attempts - 1, 30)), MAX_BACKOFF)


def _due(now: datetime):
    return WebhookDelivery.objects.filter(
        status=Delivery.PENDING, next_attempt_at__lte=now, endpoint__is_active=True
    )


def delivery_attempt(*, delivery_id: int) -> bool:
    """POST one due delivery if nobody else is; returns True when this call delivered it.

    Never raises for the receiver's failures: they are recorded and the row is retried
    by the sweep after its backoff, or marked failed after the last attempt.
    """
    started_at = _now()
    if not outbox.claim(_due(started_at).filter(pk=delivery_id), now=started_at):
        return False
    delivery = WebhookDelivery.objects.select_related("endpoint").get(pk=delivery_id)
    body = delivery_body(delivery)
    headers = delivery_headers(delivery, body, now=started_at)
    clock = time.monotonic()
    response = http_post(
        delivery.endpoint.url, body, headers, timeout=settings.PORTAL_WEBHOOK_TIMEOUT_SECONDS
    )
    duration_ms = round((time.monotonic() - clock) * 1000)
    _record(delivery, response, started_at=started_at, duration_ms=duration_ms)
    return response.is_success


def _record(
    delivery: WebhookDelivery, response: Response, *, started_at: datetime, duration_ms: int
) -> None:
    finished = _now()
    outcome: dict[str, Any] = {
        "claimed_at": None,
        "last_response_status": response.status,
        "last_error": response.error,
    }
    if response.is_success:
        outcome.update(status=Delivery.DELIVERED, delivered_at=finished)
    elif delivery.attempts >= settings.PORTAL_WEBHOOK_MAX_ATTEMPTS:
        outcome.update(status=Delivery.FAILED, failed_at=finished)
    else:
        outcome.update(next_attempt_at=finished + backoff(delivery.attempts))
    with transaction.atomic():
        WebhookAttempt.objects.create(
            delivery=delivery,
            number=delivery.attempts,
            started_at=started_at,
            duration_ms=duration_ms,
            response_status=response.status,
            response_body=response.body,
            error=response.error,
        )
        WebhookDelivery.objects.filter(pk=delivery.pk).update(**outcome)
    if not response.is_success:
        logger.warning(
            "webhook delivery %s (%s to endpoint %s), attempt %s: %s%s",
            delivery.uuid,
            delivery.event_type,
            delivery.endpoint_id,
            delivery.attempts,
            response.status or response.error,
            "; failed for good" if outcome.get("status") == Delivery.FAILED else "",
        )


def webhook_due_ids(*, limit: int = SWEEP_BATCH) -> list[int]:
    now = _now()
    due = _due(now).filter(outbox.unclaimed(now)).order_by("next_attempt_at", "pk")
    return list(due.values_list("pk", flat=True)[:limit])


def webhook_sweep() -> int:
    """Enqueue every delivery that is due (a task each, so that one slow receiver does not
    hold the sweep); returns how many. Rerun-safe: each is claimed before it is sent."""
    due = webhook_due_ids()
    for delivery_id in due:
        _enqueue(delivery_id)
    return len(due)


# --- operators' actions -----------------------------------------------------------------


def deliveries_retry(*, delivery_ids: Iterable[int]) -> int:
    """Send pending or failed deliveries once more now; returns how many. A failed one that
    fails again stays failed; a delivered one is never sent again."""
    now = _now()
    rows = WebhookDelivery.objects.filter(
        pk__in=list(delivery_ids), status__in=(Delivery.PENDING, Delivery.FAILED)
    )
    ids = list(rows.values_list("pk", flat=True))
    WebhookDelivery.objects.filter(pk__in=ids).update(
        status=Delivery.PENDING, failed_at=None, next_attempt_at=now
    )
    for delivery_id in ids:
        transaction.on_commit(partial(_enqueue, delivery_id))
    return len(ids)


def endpoint_rotate_secret(*, endpoint: WebhookEndpoint) -> WebhookEndpoint:
    """A new secret; the old one still signs (as a second v1) for SECRET_GRACE."""
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_expires_at = _now() + SECRET_GRACE
    endpoint.secret = new_webhook_secret()
    endpoint.save(
        update_fields=["secret", "previous_secret", "previous_secret_expires_at", "updated_at"]
    )
    return endpoint
