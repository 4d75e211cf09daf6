"""The reviewer dashboard's figures, each aggregated in the database.

Four queries whatever the number of applications:
- pending: applications awaiting a reviewer (status submitted), by days since submission;
- decisions per day: approvals and rejections (ApplicationEvent) over the last 30 days;
- automatic vs manual: decisions (approved, rejected, info_requested) over the same
  window taken by an approval policy or by a person. A policy's event names its policy
  and rule in `actor_label` (its `actor` is the policy's service account, and its
  `policy_rule` is cleared if the rule is deleted), so a non-blank label is automatic;
- median time to decision: from submission to the approval or rejection, same window,
  read as the middle one or two rows of the ordered durations.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

from django.db.models import Count, DurationField, ExpressionWrapper, F, Q
from django.db.models.functions import TruncDate
from django.utils import timezone

from access.models import Application, ApplicationEvent

Action = ApplicationEvent.Action
WINDOW_DAYS = 30
# (label, from days, to days): an application in a bucket is at least `from` and less
# than `to` days old.
AGE_BUCKETS = (
    ("< 1 day", 0, 1),
    ("1–3 days", 1, 3),
    ("3–7 days", 3, 7),
    ("7–30 days", 7, 30),
    ("> 30 days", 30, None),
)
OUTCOMES = (Action.APPROVED, Action.REJECTED)
DECISIONS = (Action.APPROVED, Action.REJECTED, Action.INFO_REQUESTED)
AUTOMATIC = ~Q(actor_label="")


@dataclass(frozen=True)
class DayDecisions:
    day: date
    approved: int
    rejected: int

    @property
    def total(self) -> int:
        return self.approved + self.rejected


@dataclass(frozen=True)
class Dashboard:
    pending: list[tuple[str, int]]
    days: list[DayDecisions]  # WINDOW_DAYS of them, oldest first, days without any included
    median_to_decision: timedelta | None
    automatic: int
    manual: int

    @property
    def pending_total(self) -> int:
        return sum(count for _, count in self.pending)

    @property
    def decided(self) -> int:
        return sum(day.total for day in self.days)

    @property
    def automatic_percent(self) -> float | None:
        total = self.automatic + self.manual
        return None if total == 0 else 100 * self.automatic / total


def _pending_by_age(now: datetime) -> list[tuple[str, int]]:
    def bucket(low: int, high: int | None) -> Q:
        condition = Q(submitted_at__lte=now - timedelta(days=low))
        if high is not None:
            condition &= Q(submitted_at__gt=now - timedelta(days=high))
        return condition

    counts = Application.objects.filter(status__in=Application.AWAITING_REVIEW).aggregate(
        **{
            f"bucket{index}": Count("pk", filter=bucket(low, high))
            for index, (_, low, high) in enumerate(AGE_BUCKETS)
        }
    )
    return [(label, counts[f"bucket{index}"]) for index, (label, _, _) in enumerate(AGE_BUCKETS)]


def _decisions_per_day(since: datetime, days: list[date]) -> list[DayDecisions]:
    rows = (
        ApplicationEvent.objects.filter(action__in=OUTCOMES, created_at__gte=since)
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(
            approved=Count("pk", filter=Q(action=Action.APPROVED)),
            rejected=Count("pk", filter=Q(action=Action.REJECTED)),
        )
        .order_by("day")
    )
    counted = {row["day"]: row for row in rows}
    return [
        DayDecisions(
            day=day,
            approved=counted.get(day, {}).get("approved", 0),
            rejected=counted.get(day, {}).get("rejected", 0),
        )
        for day in days
    ]


def _automatic_and_manual(since: datetime) -> tuple[int, int]:
    counts = ApplicationEvent.objects.filter(action__in=DECISIONS, created_at__gte=since).aggregate(
        automatic=Count("pk", filter=AUTOMATIC),
        manual=Count("pk", filter=~AUTOMATIC),
    )
    return counts["automatic"], counts["manual"]


def _median_to_decision(since: datetime, decided: int) -> timedelta | None:
    durations = (
        ApplicationEvent.objects.filter(
            action__in=OUTCOMES, created_at__gte=since, application__submitted_at__isnull=False
        )
        .annotate(
            waited=ExpressionWrapper(
                F("created_at") - F("application__submitted_at"), output_field=DurationField()
            )
        )
        .order_by("waited", "pk")
        .values_list("waited", flat=True)
    )
    # The query runs even when nothing was decided, so the count of queries never varies.
    middle = list(durations[max(decided - 1, 0) // 2 : decided // 2 + 1])
    if not middle:
        return None
    return sum(middle, timedelta()) / len(middle)


def dashboard_figures(*, now: datetime | None = None) -> Dashboard:
    now = now or timezone.now()
    today = timezone.localdate(now)
    days = [today - timedelta(days=back) for back in range(WINDOW_DAYS - 1, -1, -1)]
    since = timezone.make_aware(datetime.combine(days[0], time.min))
    per_day = _decisions_per_day(since, days)
    automatic, manual = _automatic_and_manual(since)
    return Dashboard(
        pending=_pending_by_age(now),
        days=per_day,
        median_to_decision=_median_to_decision(since, sum(day.total for day in per_day)),
        automatic=automatic,
        manual=manual,
    )


# --- the chart -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    day: DayDecisions
    x: float
    approved_y: float
    approved_height: float
    rejected_y: float
    rejected_height: float


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bar_width: float
    scale_max: int
    bars: list[Bar]


def decisions_chart(days: list[DayDecisions], *, width: int = 600, height: int = 160) -> Chart:
    """Geometry of a stacked bar chart (approved below, rejected above), one bar a day,
    drawn by the template as inline SVG: no script, so the site's CSP has nothing to say."""
    scale_max = max([day.total for day in days] + [1])
    slot = width / max(len(days), 1)
    bar_width = slot * 0.8
    bars = []
    for index, day in enumerate(days):
        approved_height = height * day.approved / scale_max
        rejected_height = height * day.rejected / scale_max
        approved_y = height - approved_height
        bars.append(
            Bar(
                day=day,
                x=round(index * slot + (slot - bar_width) / 2, 2),
                approved_y=round(approved_y, 2),
                approved_height=round(approved_height, 2),
                rejected_y=round(approved_y - rejected_height, 2),
                rejected_height=round(rejected_height, 2),
            )
        )
    return Chart(
        width=width, height=height, bar_width=round(bar_width, 2), scale_max=scale_max, bars=bars
    )


def duration_text(value: timedelta | None) -> str:
    """e.g. "2 d 4 h", "3 h 20 min", "45 min"; "—" for None."""
    if value is None:
        return "—"
    minutes = int(value.total_seconds() // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min"
