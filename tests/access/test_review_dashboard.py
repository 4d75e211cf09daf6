"""The reviewer dashboard: exact figures on a built history, the SVG chart, and a query
count that does not grow with the number of applications."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from access.models import Application, ApplicationEvent
from access.review_dashboard import dashboard_figures, decisions_chart, duration_text
from tests.factories import ApplicationFactory, UserFactory
from tests.twofactor import login_with_2fa

pytestmark = pytest.mark.django_db
Status = Application.Status
Action = ApplicationEvent.Action
URL = reverse("admin:access_reviewdashboard_changelist")
POLICY_LABEL = "policy llama-7b: rule verified institution"


def pending(now, *ages_in_hours: float) -> None:
    for hours in ages_in_hours:
        ApplicationFactory(status=Status.SUBMITTED, submitted_at=now - timedelta(hours=hours))


def decided(now, actor, *, action, days_ago: float, waited_hours: float, label: str = ""):
    """An application submitted `waited_hours` before a decision taken `days_ago` days ago."""
    at = now - timedelta(days=days_ago)
    status = Status.APPROVED if action == Action.APPROVED else Status.REJECTED
    if action == Action.INFO_REQUESTED:
        status = Status.INFO_REQUESTED
    application = ApplicationFactory(
        status=status, submitted_at=at - timedelta(hours=waited_hours), decided_at=at
    )
    return ApplicationEvent.objects.create(
        application=application,
        actor=actor,
        action=action,
        from_status=Status.SUBMITTED,
        to_status=status,
        created_at=at,
        actor_label=label,
    )


@pytest.fixture
def history(reviewer):
    """A fixed clock at noon, and a history around it."""
    now = timezone.now().replace(hour=12, minute=0, second=0, microsecond=0)
    policy = UserFactory(username="policy", email="policy@portal.invalid")
    # Pending by age: 2 under a day, 1 of 1–3, 0 of 3–7, 1 of 7–30, 2 over 30 days.
    pending(now, 1, 23, 30, 24 * 10, 24 * 31, 24 * 200)
    # Decisions: today 2 approved (one by the policy) and 1 rejected; 3 days ago 1
    # approved; 40 days ago (outside the window) 1 rejected; info requested once by the
    # policy and once by a person 5 days ago.
    decided(now, reviewer, action=Action.APPROVED, days_ago=0, waited_hours=2)
    decided(now, policy, action=Action.APPROVED, days_ago=0, waited_hours=0.5, label=POLICY_LABEL)
    decided(now, reviewer, action=Action.REJECTED, days_ago=0, waited_hours=10)
    decided(now, reviewer, action=Action.APPROVED, days_ago=3, waited_hours=50)
    decided(now, reviewer, action=Action.REJECTED, days_ago=40, waited_hours=1000)
    decided(
        now, policy, action=Action.INFO_REQUESTED, days_ago=5, waited_hours=1, label=POLICY_LABEL
    )
    decided(now, reviewer, action=Action.INFO_REQUESTED, days_ago=5, waited_hours=1)
    return now


def test_figures_on_a_built_history(history):
    figures = dashboard_figures(now=history)
    assert figures.pending == [
        ("< 1 day", 2),
        ("1–3 days", 1),
        ("3–7 days", 0),
        ("7–30 days", 1),
        ("> 30 days", 2),
    ]
    assert figures.pending_total == 6
    assert len(figures.days) == 30
    assert figures.days[-1].day == timezone.localdate(history)
    by_day = {d.day: (d.approved, d.rejected) for d in figures.days if d.total}
    today = timezone.localdate(history)
    assert by_day == {today: (2, 1), today - timedelta(days=3): (1, 0)}
    assert figures.decided == 4
    # Waits of 0.5, 2, 10 and 50 hours: the median is (2 + 10) / 2 = 6 hours.
    assert figures.median_to_decision == timedelta(hours=6)
    assert duration_text(figures.median_to_decision) == "6 h 0 min"
    # Six decisions in the window (4 outcomes and 2 questions), two by the policy.
    assert (figures.automatic, figures.manual) == (2, 4)
    assert round(figures.automatic_percent, 2) == 33.33


def test_an_odd_number_of_decisions_has_a_middle_one(history, reviewer):
    decided(history, reviewer, action=Action.REJECTED, days_ago=1, waited_hours=100)
    figures = dashboard_figures(now=history)
    assert figures.decided == 5
    assert figures.median_to_decision == timedelta(hours=10)


def test_empty_figures():
    figures = dashboard_figures()
    assert [count for _, count in figures.pending] == [0, 0, 0, 0, 0]
    assert (figures.decided, figures.median_to_decision) == (0, None)
    assert (figures.automatic, figures.manual, figures.automatic_percent) == (0, 0, None)


def test_chart_geometry():
    figures = dashboard_figures()
    chart = decisions_chart(figures.days, width=300, height=100)
    assert (chart.scale_max, len(chart.bars), chart.bar_width) == (1, 30, 8.0)
    assert chart.bars[0].x == 1.0
    assert all(bar.approved_height == bar.rejected_height == 0 for bar in chart.bars)


def test_page_shows_figures_and_an_svg_chart(reviewer_client, history):
    response = reviewer_client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in html
    assert "<script" not in html.split('id="decisions-per-day"')[1].split("</svg>")[0]
    today = timezone.localdate(history).isoformat()
    assert html.count('<rect class="approved"') == 2
    assert html.count('<rect class="rejected"') == 1
    assert f'<g data-day="{today}"><title>' in html
    assert '<td id="decided">4</td>' in html
    assert '<td id="median">6 h 0 min</td>' in html
    assert '<td id="automatic">2 (33%)</td>' in html
    assert '<td data-bucket="4">2</td>' in html
    # The admin index lists it for reviewers.
    index = reviewer_client.get(reverse("admin:index"))
    assert URL.encode() in index.content


def test_page_is_for_reviewers_only(password):
    sam = UserFactory(username="sam", email="sam@portal.example.org", is_staff=True)
    sam.user_permissions.add(Permission.objects.get(codename="view_application"))
    client = login_with_2fa(Client(), sam, password)
    assert client.get(URL).status_code == 403
    assert URL.encode() not in client.get(reverse("admin:index")).content


def _queries(client) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get(URL).status_code == 200
    return len(captured)


def test_query_count_does_not_grow_with_applications(reviewer_client, reviewer):
    empty = _queries(reviewer_client)
    with CaptureQueriesContext(connection) as figures_only:
        dashboard_figures()
    assert len(figures_only) == 4
    now = timezone.now()
    pending(now, *[hours * 7 for hours in range(120)])
    for index in range(60):
        decided(
            now,
            reviewer,
            action=Action.APPROVED if index % 3 else Action.REJECTED,
            days_ago=index % 35,
            waited_hours=index + 1,
            label=POLICY_LABEL if index % 4 == 0 else "",
        )
    assert Application.objects.count() == 180
    assert _queries(reviewer_client) == empty
