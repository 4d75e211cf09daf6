"""Export review decisions or download events as CSV, streamed row by row.

Cells that a spreadsheet could run as a formula are prefixed with an apostrophe: names,
reasons and user agents come from outside. That is any text starting with a control or
format character, or whose first visible character is = + - @ or a look-alike that
spreadsheets fold to one (fullwidth ＝＋－＠, small ﹦﹢﹣, the minus sign −).

Decisions carry the applicant's answers to the releases' extra questions in one JSON
column, `{"release-slug": {"question_key": value}}`: releases add and version their own
questions, so one column keeps the header stable.
"""

from __future__ import annotations

import csv
import json
import unicodedata
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from typing import IO

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Prefetch
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from access.models import ApplicationEvent, RequestAnswer
from weights.models import DownloadEvent

DECISION_COLUMNS = [
    "event_id",
    "created_at",
    "application_id",
    "applicant_email",
    "applicant_name",
    "affiliation",
    "country",
    "action",
    "from_status",
    "to_status",
    "actor_email",
    "reason",
    "releases",
    "answers",
]
DOWNLOAD_COLUMNS = [
    "event_id",
    "created_at",
    "user_email",
    "release",
    "file",
    "link",
    "ip_address",
    "user_agent",
    "range",
    "bytes",
    "status_code",
    "outcome",
]
_FORMULA_TRIGGERS = frozenset("=+-@\u2212")


def parse_since(value: str) -> datetime:
    """A date (midnight UTC) or an ISO 8601 date-time (UTC unless it says otherwise)."""
    try:
        moment = parse_datetime(value)
        if moment is None:
            moment = datetime.combine(date.fromisoformat(value), time.min)
    except ValueError:
        raise CommandError(f"--since: {value!r} is not a date (YYYY-MM-DD) or date-time") from None
    if timezone.is_naive(moment):
        moment = moment.replace(tzinfo=UTC)
    return moment


def is_formula_risk(value: str) -> bool:
    """Whether a spreadsheet might read the text as a formula (or hide how it starts)."""
    for char in value:
        if unicodedata.category(char)[0] == "C":  # tab, CR, \x0b, bidi and zero-width marks
            return True
        if not char.isspace():
            return unicodedata.normalize("NFKC", char)[:1] in _FORMULA_TRIGGERS
    return False


def _cell(value: object) -> object:
    if isinstance(value, str) and is_formula_risk(value):
        return "'" + value
    return value


def decision_rows(since: datetime | None) -> Iterator[list[object]]:
    events = (
        ApplicationEvent.objects.filter(action__in=ApplicationEvent.DECISIONS)
        .select_related("application__applicant", "actor")
        .prefetch_related(
            Prefetch(
                "application__request_answers",
                queryset=RequestAnswer.objects.select_related("question__form__release"),
            )
        )
    )
    if since is not None:
        events = events.filter(created_at__gte=since)
    for e in events.order_by("created_at", "pk").iterator(chunk_size=1000):
        a = e.application
        yield [
            e.pk,
            e.created_at.isoformat(),
            a.pk,
            a.applicant.email,
            a.full_name,
            a.affiliation,
            str(a.country),
            e.action,
            e.from_status,
            e.to_status,
            e.actor.email,
            e.message,
            " ".join(e.releases or []),
            _answers_json(a),
        ]


def _answers_json(application) -> str:
    answers: dict[str, dict[str, object]] = {}
    for answer in application.request_answers.all():
        question = answer.question
        answers.setdefault(question.form.release.slug, {})[question.key] = answer.value
    return json.dumps(answers, ensure_ascii=False, sort_keys=True) if answers else ""


def download_rows(since: datetime | None) -> Iterator[list[object]]:
    events = DownloadEvent.objects.select_related(
        "user", "link__grant__release", "artifact__release"
    )
    if since is not None:
        events = events.filter(created_at__gte=since)
    for e in events.order_by("created_at", "pk").iterator(chunk_size=1000):
        release = (
            e.artifact.release.slug
            if e.artifact is not None
            else (e.link.grant.release.slug if e.link is not None else "")
        )
        yield [
            e.pk,
            e.created_at.isoformat(),
            e.user.email if e.user is not None else "",
            release,
            e.artifact.path if e.artifact is not None else "",
            e.link.token_hint if e.link is not None else "",
            e.ip_address or "",
            e.user_agent,
            e.range_header,
            e.bytes,
            e.status_code,
            e.outcome,
        ]


EXPORTS = {
    "decisions": (DECISION_COLUMNS, decision_rows),
    "downloads": (DOWNLOAD_COLUMNS, download_rows),
}


class Command(BaseCommand):
    help = "Export review decisions or download events as CSV (header row first)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("kind", choices=sorted(EXPORTS))
        parser.add_argument(
            "--since", help="Only records from this date (YYYY-MM-DD, UTC) or date-time on."
        )
        parser.add_argument("--out", help="Write to this file instead of standard output.")

    def handle(self, *args, **options) -> None:
        since = parse_since(options["since"]) if options["since"] else None
        columns, rows = EXPORTS[options["kind"]]
        if options["out"]:
            with open(options["out"], "w", newline="", encoding="utf-8") as out:
                count = self._write(out, columns, rows(since))
            self.stderr.write(f"Wrote {count} {options['kind']} rows to {options['out']}.")
        else:
            self._write(_Passthrough(self.stdout), columns, rows(since))

    def _write(self, out: IO[str], columns: list[str], rows: Iterator[list[object]]) -> int:
        writer = csv.writer(out)
        writer.writerow(columns)
        count = 0
        for row in rows:
            writer.writerow([_cell(value) for value in row])
            count += 1
        return count


class _Passthrough:
    """csv.writer writes whole lines; send them to the command's stdout unchanged."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        self.stream.write(text, ending="")
