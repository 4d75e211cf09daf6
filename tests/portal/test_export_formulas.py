"""export_records never hands a spreadsheet a formula, however the value is disguised."""

from __future__ import annotations

import csv
import io

import pytest
from django.core.management import call_command

from access.models import Application
from access.services.reviews import application_reject
from weights.models import DownloadEvent

pytestmark = pytest.mark.django_db

HOSTILE = [
    '=HYPERLINK("http://x")',
    "+1+1",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
    "\x0b=cmd|'/c calc'!A1",
    "\x0c=1+1",
    "\x1b=1+1",
    " =1+1",
    "\u00a0=1+1",
    "\u3000=1+1",
    "\u200b=1+1",
    "\u202e=1+1",
    "\ufeff=1+1",
    "\uff1d1+1",  # fullwidth =
    "\uff0b1+1",  # fullwidth +
    "\uff0d1+1",  # fullwidth -
    "\uff20SUM(A1)",  # fullwidth @
    "\ufe661+1",  # small =
    "\u22121+1",  # minus sign
    "\u200b",
]
HARMLESS = ["Alice Researcher", "a=b", "1-2", "Zoë Ångström 王小明", "", "   "]


def export(kind: str) -> list[dict[str, str]]:
    out = io.StringIO()
    call_command("export_records", kind, stdout=out)
    return list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))


def test_every_formula_trigger_in_a_download_is_neutralised(alice):
    for value in HOSTILE + HARMLESS:
        DownloadEvent.objects.create(
            user=alice, user_agent=value, range_header=value, status_code=403, outcome="invalid"
        )
    rows = export("downloads")
    exported = [(row["user_agent"], row["range"]) for row in rows]
    expected = [("'" + v, "'" + v) for v in HOSTILE] + [(v, v) for v in HARMLESS]
    assert exported == expected


def test_names_and_reasons_in_decisions_are_neutralised(bob, reviewer, make_submitted):
    application = make_submitted(bob, slugs=("llama-13b",))
    # Rows from before names were validated can hold control characters.
    Application.objects.filter(pk=application.pk).update(
        full_name="\x0b=cmd", affiliation="\uff1dHYPERLINK(1)"
    )
    application_reject(application=application, reviewer=reviewer, reason="\uff20SUM(1)")
    (row,) = export("decisions")
    assert (row["applicant_name"], row["affiliation"], row["reason"]) == (
        "'\x0b=cmd",
        "'\uff1dHYPERLINK(1)",
        "'\uff20SUM(1)",
    )
