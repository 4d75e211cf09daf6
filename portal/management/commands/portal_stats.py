"""Figures an operator reports on: applications, time to decision, downloads, demo use, mail."""

from __future__ import annotations

import json
import statistics
from typing import Any

from django.core.management.base import BaseCommand
from django.db.models import Count, Min, Q, Sum
from django.template.defaultfilters import filesizeformat

from access.models import Application, ApplicationEvent
from access.services.notifications import outbox_counts
from inference_demo.models import DemoRequest
from weights.models import DownloadEvent, Release

FINAL_DECISIONS = (ApplicationEvent.Action.APPROVED, ApplicationEvent.Action.REJECTED)
# The outcomes that delivered bytes; HEAD, 304, 416 and refusals send none.
DELIVERED = (
    DownloadEvent.Outcome.SERVED,
    DownloadEvent.Outcome.PARTIAL,
    DownloadEvent.Outcome.REDIRECTED,
)


def application_stats() -> dict[str, Any]:
    counts = dict(Application.objects.values_list("status").annotate(n=Count("pk")).order_by())
    by_status = {status: counts.get(status, 0) for status in Application.Status.values}
    # From submission to the first approval or rejection; a later revocation does not count.
    decided = (
        Application.objects.filter(submitted_at__isnull=False)
        .annotate(
            first_decision=Min("events__created_at", filter=Q(events__action__in=FINAL_DECISIONS))
        )
        .filter(first_decision__isnull=False)
    )
    hours = [
        (first - submitted).total_seconds() / 3600
        for submitted, first in decided.values_list("submitted_at", "first_decision")
    ]
    return {
        "by_status": by_status,
        "total": sum(by_status.values()),
        "decided": len(hours),
        "median_hours_to_decision": round(statistics.median(hours), 2) if hours else None,
    }


def download_stats() -> list[dict[str, Any]]:
    rows = {
        row["link__grant__release__slug"]: row
        for row in DownloadEvent.objects.filter(link__isnull=False)
        .values("link__grant__release__slug")
        .annotate(
            requests=Count("pk"),
            delivered=Count("pk", filter=Q(outcome__in=DELIVERED)),
            bytes=Sum("bytes"),
        )
        .order_by()
    }
    result = []
    for release in Release.objects.order_by("sort_order", "slug"):
        row = rows.get(release.slug, {})
        result.append(
            {
                "release": release.slug,
                "requests": row.get("requests", 0),
                "delivered": row.get("delivered", 0),
                "bytes": row.get("bytes") or 0,
            }
        )
    return result


def demo_stats() -> dict[str, Any]:
    totals = DemoRequest.objects.aggregate(
        requests=Count("pk"), tokens_in=Sum("tokens_in"), tokens_out=Sum("tokens_out")
    )
    counts = dict(DemoRequest.objects.values_list("status").annotate(n=Count("pk")).order_by())
    return {
        "requests": totals["requests"],
        "tokens_in": totals["tokens_in"] or 0,
        "tokens_out": totals["tokens_out"] or 0,
        "by_status": {status: counts.get(status, 0) for status in DemoRequest.Status.values},
    }


def portal_stats() -> dict[str, Any]:
    return {
        "applications": application_stats(),
        "downloads": download_stats(),
        "demo": demo_stats(),
        "notifications": outbox_counts(),
    }


class Command(BaseCommand):
    help = (
        "Applications by status, median time to decision, downloads per release, demo use, "
        "notifications sent, pending and failed."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args, **options) -> None:
        stats = portal_stats()
        if options["json"]:
            self.stdout.write(json.dumps(stats, indent=2))
            return
        apps = stats["applications"]
        self.stdout.write(f"Applications: {apps['total']}")
        for status, n in apps["by_status"].items():
            self.stdout.write(f"  {status:<16}{n:>8}")
        median = apps["median_hours_to_decision"]
        self.stdout.write(
            "Median time to decision: "
            + (f"{median:.1f} h ({median / 24:.1f} days)" if median is not None else "n/a")
            + f" over {apps['decided']} decided"
        )
        self.stdout.write("Downloads per release (requests, delivered, bytes):")
        for row in stats["downloads"]:
            self.stdout.write(
                f"  {row['release']:<16}{row['requests']:>8}{row['delivered']:>8}"
                f"{row['bytes']:>16}  {filesizeformat(row['bytes'])}"
            )
        demo = stats["demo"]
        self.stdout.write(
            f"Demo: {demo['requests']} requests, {demo['tokens_in']} prompt tokens, "
            f"{demo['tokens_out']} generated tokens"
        )
        for status, n in demo["by_status"].items():
            self.stdout.write(f"  {status:<16}{n:>8}")
        mail = stats["notifications"]
        self.stdout.write(
            f"Notifications: {mail['sent']} sent, {mail['pending']} pending, "
            f"{mail['failed']} failed"
            + (" (see the admin's notification list, delivery: Failed)" if mail["failed"] else "")
        )
