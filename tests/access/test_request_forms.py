"""Per-release request forms: operators write questions, applicants answer them on the page
and the API, reviewers and the export read the answers, and an edited form keeps the
version that was answered."""

from __future__ import annotations

import csv
import html
import io
import json

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from access.forms import answer_field_name
from access.models import Application, QuestionKind, RequestAnswer, RequestForm, RequestQuestion
from access.services import request_forms as rf
from access.services.applications import application_save_draft, application_submit
from access.services.request_forms import QuestionSpec, answers_for
from access.services.reviews import application_reject
from access.validators import INVISIBLE_CHARACTER
from tests.conftest import FIELDS
from tests.factories import UserFactory, accept_license
from tests.openapi import component_validator
from tests.tokens import api_token
from tests.twofactor import login_with_2fa

pytestmark = pytest.mark.django_db
K = QuestionKind
S = Application.Status
APPLY = reverse("access:apply")

QUESTIONS = [
    QuestionSpec("lab", K.TEXT, "Lab name", "The group you work in.", required=True),
    QuestionSpec("plan", K.LONG_TEXT, "Evaluation plan"),
    QuestionSpec("terms", K.CHECKBOX, "I will not redistribute the weights", required=True),
    QuestionSpec("sector", K.SELECT, "Sector", options=["Academia", "Non-profit"]),
    QuestionSpec("start", K.DATE, "Project start"),
    QuestionSpec("base", K.COUNTRY, "Where the work happens"),
    QuestionSpec("site", K.URL, "Lab website"),
]
GOOD = {
    "lab": "Calibration Lab",
    "plan": "Line one\nLine two",
    "terms": True,
    "sector": "Academia",
    "start": "2025-01-31",
    "base": "de",
    "site": "https://lab.example.edu/people",
}
STORED = {**GOOD, "base": "DE"}


def text(response) -> str:
    return html.unescape(response.content.decode())


@pytest.fixture
def form_7b(releases):
    return rf.request_form_create(release=releases["llama-7b"], questions=QUESTIONS)


def page_data(releases, form, answers, *, slugs=("llama-7b",), action="save", **extra):
    data = {
        **FIELDS,
        "requested_releases": [releases[s].pk for s in slugs],
        "accept_license": "on",
        "action": action,
        **extra,
    }
    for key, value in answers.items():
        if value is True:
            value = "on"
        if value is not False:
            data[answer_field_name(form.release_id, key)] = value
    return data


# --- the admin --------------------------------------------------------------------------


@pytest.fixture
def operator_client(password):
    operator = UserFactory(
        username="olga", email="olga@portal.example.org", is_staff=True, is_superuser=True
    )
    return login_with_2fa(Client(), operator, password)


def inline_data(rows, *, initial=0, ids=()):
    data = {
        "questions-TOTAL_FORMS": str(len(rows)),
        "questions-INITIAL_FORMS": str(initial),
        "questions-MIN_NUM_FORMS": "0",
        "questions-MAX_NUM_FORMS": "1000",
    }
    for i, row in enumerate(rows):
        for name, value in row.items():
            data[f"questions-{i}-{name}"] = value
        if i < len(ids):
            data[f"questions-{i}-id"] = str(ids[i])
    return data


def question_row(order, key, kind, label, *, required=False, options="", help_text=""):
    row = {"order": str(order), "key": key, "kind": kind, "label": label, "options": options}
    row["help_text"] = help_text
    if required:
        row["required"] = "on"
    return row


def test_operator_creates_a_form_with_questions_in_the_admin(operator_client, releases):
    response = operator_client.post(
        reverse("admin:access_requestform_add"),
        {
            "release": releases["llama-7b"].pk,
            **inline_data(
                [
                    question_row(0, "lab", "text", "Lab name", required=True, help_text="Yours."),
                    question_row(1, "sector", "select", "Sector", options="Academia\nNon-profit\n"),
                ]
            ),
        },
    )
    assert response.status_code == 302, response.context and response.context["errors"]
    form = RequestForm.objects.get()
    assert (form.release.slug, form.version) == ("llama-7b", 1)
    assert list(form.questions.values_list("key", "kind", "required", "options", "help_text")) == [
        ("lab", "text", True, [], "Yours."),
        ("sector", "select", False, ["Academia", "Non-profit"], ""),
    ]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([question_row(0, "sector", "select", "Sector")], rf.SELECT_NEEDS_OPTIONS),
        ([question_row(0, "lab", "text", "Lab", options="A")], rf.OPTIONS_ONLY_FOR_SELECT),
        (
            [question_row(0, "lab", "text", "Lab"), question_row(1, "lab", "url", "Lab site")],
            rf.DUPLICATE_KEY.format(key="lab"),
        ),
        (
            [question_row(0, "lab", "text", "Lab\u202ename")],
            INVISIBLE_CHARACTER.format(label="Label", char="U+202E RIGHT-TO-LEFT OVERRIDE"),
        ),
        (
            [question_row(0, "sector", "select", "Sector", options="A\nA")],
            rf.DUPLICATE_OPTION.format(option="A"),
        ),
    ],
)
def test_bad_questions_are_form_errors_and_save_nothing(operator_client, releases, rows, expected):
    response = operator_client.post(
        reverse("admin:access_requestform_add"),
        {"release": releases["llama-7b"].pk, **inline_data(rows)},
    )
    assert response.status_code == 200
    assert expected in text(response)
    assert not RequestForm.objects.exists() and not RequestQuestion.objects.exists()


def test_editing_an_unanswered_form_changes_it_in_place(operator_client, form_7b):
    ids = list(form_7b.questions.values_list("pk", flat=True))[:1]
    response = operator_client.post(
        reverse("admin:access_requestform_change", args=[form_7b.pk]),
        inline_data(
            [question_row(0, "lab", "text", "Laboratory", required=True)], initial=1, ids=ids
        ),
    )
    assert response.status_code == 302
    assert RequestForm.objects.count() == 1
    assert list(form_7b.questions.values_list("key", "label")) == [("lab", "Laboratory")]


def test_editing_an_answered_form_makes_a_new_version_and_keeps_the_old_answers(
    operator_client, alice, make_submitted, form_7b, releases, license_v1
):
    draft = application_save_draft(
        applicant=alice, fields=FIELDS, releases=[releases["llama-7b"]], answers={"llama-7b": GOOD}
    )
    submitted = application_submit(
        application=draft, applicant=alice, license_acceptance=accept_license(alice, license_v1)
    )
    old_lab = form_7b.questions.get(key="lab")
    response = operator_client.post(
        reverse("admin:access_requestform_change", args=[form_7b.pk]),
        inline_data(
            [question_row(0, "lab", "text", "Laboratory and PI", required=True)],
            initial=1,
            ids=[old_lab.pk],
        ),
    )
    new = RequestForm.objects.get(version=2)
    assert response.status_code == 302
    assert response.url == reverse("admin:access_requestform_change", args=[new.pk])
    assert list(new.questions.values_list("key", "label")) == [("lab", "Laboratory and PI")]
    old_lab.refresh_from_db()
    assert old_lab.label == "Lab name" and form_7b.questions.count() == len(QUESTIONS)
    assert answers_for(submitted) == {"llama-7b": STORED}
    assert RequestAnswer.objects.get(application=submitted, question__key="lab").question == old_lab
    # The old version is now read-only evidence.
    page = operator_client.get(reverse("admin:access_requestform_change", args=[form_7b.pk]))
    assert page.status_code == 200
    assert 'name="questions-0-label"' not in text(page) and 'name="_save"' not in text(page)
    # The release API shows the new version.
    body = APIClient().get(reverse("api:release-detail", args=["llama-7b"])).json()
    assert body["request_form"]["version"] == 2
    assert [q["label"] for q in body["request_form"]["questions"]] == ["Laboratory and PI"]


def test_a_draft_follows_the_new_version_keeping_answers_that_still_fit(alice, form_7b, releases):
    draft = application_save_draft(
        applicant=alice, fields=FIELDS, releases=[releases["llama-7b"]], answers={"llama-7b": GOOD}
    )
    rf.form_questions_save(
        form=form_7b,
        questions=[
            QuestionSpec("lab", K.TEXT, "Laboratory"),
            QuestionSpec("sector", K.SELECT, "Sector", options=["Industry"]),
        ],
    )
    application_save_draft(applicant=alice, fields={}, application=draft)
    assert answers_for(draft) == {"llama-7b": {"lab": "Calibration Lab"}}
    assert RequestAnswer.objects.get(application=draft).question.form.version == 2


# --- the apply page ---------------------------------------------------------------------


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


def test_apply_page_shows_the_questions_grouped_by_release(alice_client, form_7b, license_v1):
    page = text(alice_client.get(APPLY))
    assert 'data-release="llama-7b"' in page and 'data-release="llama-13b"' not in page
    assert "Lab name *" in page and "The group you work in." in page
    assert f'name="{answer_field_name(form_7b.release_id, "start")}"' in page
    assert 'type="date"' in page and '<option value="Academia">' in page


def test_apply_page_saves_valid_answers_and_shows_them_again(
    alice_client, alice, form_7b, releases, license_v1
):
    response = alice_client.post(APPLY, page_data(releases, form_7b, GOOD))
    assert response.status_code == 302
    assert answers_for(Application.objects.get(applicant=alice)) == {"llama-7b": STORED}
    page = text(alice_client.get(APPLY))
    assert 'value="Calibration Lab"' in page and '<option value="DE" selected>' in page


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "sector",
            "Industry",
            rf.NOT_AN_OPTION.format(value="Industry", options="“Academia”, “Non-profit”"),
        ),
        ("start", "31/01/2025", rf.BAD_DATE),
        ("start", "2025-02-30", rf.NOT_A_DATE.format(value="2025-02-30")),
        ("base", "XX", rf.UNKNOWN_COUNTRY.format(value="XX")),
        ("site", "ftp://lab.example.edu", rf.URL_SCHEME),
        ("site", "https://", rf.BAD_URL),
        ("lab", "L" * 501, rf.TOO_LONG.format(limit=500, count=501)),
        (
            "lab",
            "Lab\u200b",
            INVISIBLE_CHARACTER.format(label="Lab name", char="U+200B ZERO WIDTH SPACE"),
        ),
        (
            "plan",
            "ok\x1b[31m",
            INVISIBLE_CHARACTER.format(label="Evaluation plan", char="U+001B ESCAPE"),
        ),
    ],
)
def test_apply_page_refuses_a_bad_answer_precisely_and_saves_nothing(
    alice_client, form_7b, releases, license_v1, key, value, expected
):
    response = alice_client.post(APPLY, page_data(releases, form_7b, {**GOOD, key: value}))
    assert response.status_code == 200
    assert response.context["form"].errors == {
        answer_field_name(form_7b.release_id, key): [expected]
    }
    assert not Application.objects.exists() and not RequestAnswer.objects.exists()


def test_apply_page_ignores_questions_of_releases_not_selected(
    alice_client, alice, form_7b, releases, license_v1
):
    response = alice_client.post(
        APPLY, page_data(releases, form_7b, {"start": "not a date"}, slugs=("llama-13b",))
    )
    assert response.status_code == 302
    assert answers_for(Application.objects.get(applicant=alice)) == {}


def test_apply_page_checks_required_answers_at_submit_only(
    alice_client, alice, form_7b, releases, license_v1
):
    partial = {"plan": "Later."}
    assert alice_client.post(APPLY, page_data(releases, form_7b, partial)).status_code == 302
    response = alice_client.post(APPLY, page_data(releases, form_7b, partial, action="submit"))
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert errors[answer_field_name(form_7b.release_id, "lab")] == [rf.REQUIRED]
    assert errors[answer_field_name(form_7b.release_id, "terms")] == [rf.REQUIRED_CHECKBOX]
    assert rf.INCOMPLETE_ANSWERS.format(
        questions="LLaMA 7B: Lab name; LLaMA 7B: I will not redistribute the weights"
    ) in text(response)
    assert Application.objects.get(applicant=alice).status == S.DRAFT

    response = alice_client.post(APPLY, page_data(releases, form_7b, GOOD, action="submit"))
    application = Application.objects.get(applicant=alice)
    assert response.status_code == 302 and application.status == S.SUBMITTED
    detail = text(alice_client.get(reverse("access:application_detail", args=[application.pk])))
    assert "Where the work happens" in detail and "Germany (DE)" in detail


# --- the API ----------------------------------------------------------------------------


@pytest.fixture
def api():
    def make(user) -> APIClient:
        client = APIClient(HTTP_USER_AGENT="pytest-api/1.0")
        client.default_format = "json"
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token(user)}")
        return client

    return make


def test_release_api_lists_the_current_questions(form_7b):
    body = APIClient().get(reverse("api:release-detail", args=["llama-7b"])).json()
    assert body["request_form"]["version"] == 1
    assert body["request_form"]["questions"][3] == {
        "key": "sector",
        "kind": "select",
        "label": "Sector",
        "help_text": "",
        "required": False,
        "options": ["Academia", "Non-profit"],
    }
    other = APIClient().get(reverse("api:release-detail", args=["llama-13b"])).json()
    assert other["request_form"] is None


def test_api_create_and_submit_with_answers(api, alice, form_7b, license_v1):
    client = api(alice)
    created = client.post(
        reverse("api:application-list"),
        {**FIELDS, "releases": ["llama-7b"], "answers": {"llama-7b": {"lab": "Calibration Lab"}}},
    )
    assert created.status_code == 201, created.json()
    pk = created.json()["id"]
    group = created.json()["answers"][0]
    assert (group["release"], group["form_version"]) == ("llama-7b", 1)
    assert group["answers"][0] == {
        "key": "lab",
        "label": "Lab name",
        "kind": "text",
        "required": True,
        "value": "Calibration Lab",
    }
    submit = reverse("api:application-submit", args=[pk])
    refused = client.post(submit, {"accept_license": True})
    assert refused.status_code == 400
    assert refused.json()["errors"] == {"answers.llama-7b.terms": [rf.REQUIRED_CHECKBOX]}
    assert Application.objects.get(pk=pk).status == S.DRAFT

    patched = client.patch(
        reverse("api:application-detail", args=[pk]), {"answers": {"llama-7b": {"terms": True}}}
    )
    assert patched.status_code == 200
    assert client.post(submit, {"accept_license": True}).status_code == 200
    assert answers_for(Application.objects.get(pk=pk)) == {
        "llama-7b": {"lab": "Calibration Lab", "terms": True}
    }


def test_api_refuses_bad_answers_in_the_envelope_and_writes_nothing(api, alice, form_7b):
    response = api(alice).post(
        reverse("api:application-list"),
        {
            **FIELDS,
            "releases": ["llama-7b"],
            "answers": {
                "llama-7b": {"sector": "Industry", "terms": "yes", "nope": "x", "start": 5},
                "llama-13b": {"x": "y"},
            },
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid"
    assert body["errors"] == {
        "answers.llama-7b.sector": [
            rf.NOT_AN_OPTION.format(value="Industry", options="“Academia”, “Non-profit”")
        ],
        "answers.llama-7b.terms": [rf.NOT_BOOLEAN],
        "answers.llama-7b.nope": [rf.UNKNOWN_QUESTION.format(slug="llama-7b")],
        "answers.llama-7b.start": [rf.NOT_TEXT],
        "answers.llama-13b": [rf.NOT_REQUESTED],
    }
    assert not Application.objects.exists() and not RequestAnswer.objects.exists()


def test_schema_documents_answers_and_request_forms(api, alice):
    schema = api(alice).get("/api/schema/", {"format": "json"}).json()
    validate_schema(schema)
    components = schema["components"]["schemas"]
    write = components["PatchedApplicationWrite"]["properties"]["answers"]
    assert write["type"] == "object" and "answers.<slug>.<key>" in write["description"]
    assert "answers" in components["Application"]["required"]
    question = components["RequestQuestion"]["properties"]
    assert {"key", "kind", "label", "help_text", "required", "options"} <= set(question)
    assert "request_form" in components["ReleaseDetail"]["properties"]
    component_validator(schema, "ReleaseAnswers").validate(
        {"release": "llama-7b", "form_version": 1, "answers": []}
    )


# --- the reviewer and the export --------------------------------------------------------


def submitted_with_answers(user, releases, license_v1, answers):
    draft = application_save_draft(
        applicant=user, fields=FIELDS, releases=[releases["llama-7b"]], answers=answers
    )
    return application_submit(
        application=draft, applicant=user, license_acceptance=accept_license(user, license_v1)
    )


def test_reviewer_page_shows_each_releases_questions_and_answers(
    reviewer_client, alice, form_7b, releases, license_v1
):
    application = submitted_with_answers(alice, releases, license_v1, {"llama-7b": GOOD})
    page = text(
        reviewer_client.get(reverse("admin:access_application_change", args=[application.pk]))
    )
    assert 'id="release-answers"' in page and "request form v1" in page
    for label, shown in [
        ("Lab name", "Calibration Lab"),
        ("Project start", "2025-01-31"),
        ("Where the work happens", "Germany (DE)"),
        ("Lab website", "https://lab.example.edu/people"),
        ("I will not redistribute the weights", "Yes"),
    ]:
        assert label in page and shown in page


def test_export_records_has_the_answers_in_one_json_column(
    alice, reviewer, form_7b, releases, license_v1
):
    answers = {"llama-7b": {**GOOD, "lab": '=HYPERLINK("x")'}}
    application = submitted_with_answers(alice, releases, license_v1, answers)
    application_reject(application=application, reviewer=reviewer, reason="Not research.")
    out = io.StringIO()
    call_command("export_records", "decisions", stdout=out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 1
    assert json.loads(rows[0]["answers"]) == {"llama-7b": {**STORED, "lab": '=HYPERLINK("x")'}}
