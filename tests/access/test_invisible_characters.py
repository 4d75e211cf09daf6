"""Control, format and invisible characters are refused with the same message on every door."""

from __future__ import annotations

import html

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from rest_framework.test import APIClient

from access.models import Application, ApplicationEvent
from access.services import reviews
from access.validators import INVISIBLE_CHARACTER, NoInvisibleCharacters
from tests.conftest import FIELDS

pytestmark = pytest.mark.django_db
APPLY = reverse("access:apply")

# (field, value, label in the message, the character as the message names it)
HOSTILE = [
    ("full_name", "Alice \u202eRe", "Full name", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("full_name", "Alice\r\nBcc: x@example.org", "Full name", "U+000D CARRIAGE RETURN"),
    ("full_name", "Ali\u200bce", "Full name", "U+200B ZERO WIDTH SPACE"),
    ("full_name", "\u3164", "Full name", "U+3164 HANGUL FILLER"),
    ("affiliation", "Uni\u2066versity", "Affiliation", "U+2066 LEFT-TO-RIGHT ISOLATE"),
    ("affiliation", "Uni\ufeffversity", "Affiliation", "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
    ("role", "Post\x0bdoc", "Role or position", "U+000B LINE TABULATION"),
    ("role", "Post\tdoc", "Role or position", "U+0009 CHARACTER TABULATION"),
    ("role", "Post\u2028doc", "Role or position", "U+2028 LINE SEPARATOR"),
    (
        "homepage_url",
        "https://example.org/\u202ecod.exe",
        "Homepage",
        "U+202E RIGHT-TO-LEFT OVERRIDE",
    ),
    ("intended_use", "Study\u2060 recall.", "Intended research use", "U+2060 WORD JOINER"),
    ("intended_use", "Study\x1b[2J recall.", "Intended research use", "U+001B ESCAPE"),
    (
        "publications",
        "https://a.example\u202d",
        "Publication links",
        "U+202D LEFT-TO-RIGHT OVERRIDE",
    ),
]


def expected(label: str, char: str) -> str:
    return INVISIBLE_CHARACTER.format(label=label, char=char)


@pytest.fixture
def api(alice):
    client = APIClient()
    client.force_authenticate(alice)
    return client


@pytest.mark.parametrize(("field", "value", "label", "char"), HOSTILE)
def test_the_form_refuses_with_a_precise_message(
    client, alice, license_v1, releases, field, value, label, char
):
    client.force_login(alice)
    response = client.post(APPLY, {**FIELDS, field: value, "action": "save"})
    assert response.status_code == 200
    assert expected(label, char) in html.unescape(response.content.decode())
    assert not Application.objects.exists()


@pytest.mark.parametrize(("field", "value", "label", "char"), HOSTILE)
def test_the_api_refuses_with_the_same_message(api, releases, field, value, label, char):
    response = api.post(reverse("api:application-list"), {**FIELDS, field: value}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"] == {field: [expected(label, char)]}
    assert not Application.objects.exists()


def test_multi_line_fields_keep_line_breaks_and_tabs_but_nothing_else(
    client, alice, license_v1, releases
):
    client.force_login(alice)
    use = "Line one.\r\nLine two,\tindented."
    response = client.post(APPLY, {**FIELDS, "intended_use": use, "action": "save"})
    assert response.status_code == 302
    assert Application.objects.get(applicant=alice).intended_use == use
    response = client.post(APPLY, {**FIELDS, "intended_use": use + "\u202e", "action": "save"})
    assert expected("Intended research use", "U+202E RIGHT-TO-LEFT OVERRIDE") in html.unescape(
        response.content.decode()
    )
    assert Application.objects.get(applicant=alice).intended_use == use


@pytest.fixture
def questioned(alice, reviewer, make_submitted):
    application = make_submitted(alice)
    reviews.application_request_info(application=application, reviewer=reviewer, question="?")
    return application


def test_answers_refuse_invisible_characters_on_the_page_and_the_api(
    client, alice, api, questioned
):
    message = expected("The answer", "U+202E RIGHT-TO-LEFT OVERRIDE")
    client.force_login(alice)
    page = client.post(
        reverse("access:application_answer", args=[questioned.pk]),
        {"answer": "We study \u202erecall."},
        follow=True,
    )
    assert message in html.unescape(page.content.decode())
    response = api.post(
        reverse("api:application-answer", args=[questioned.pk]),
        {"answer": "We study \u202erecall."},
        format="json",
    )
    assert response.status_code == 400 and response.json()["errors"] == {"answer": [message]}
    assert not ApplicationEvent.objects.filter(action="answered").exists()
    questioned.refresh_from_db()
    assert questioned.status == Application.Status.INFO_REQUESTED
    response = api.post(
        reverse("api:application-answer", args=[questioned.pk]),
        {"answer": "Line one.\nLine two."},
        format="json",
    )
    assert response.status_code == 200
    assert ApplicationEvent.objects.get(action="answered").message == "Line one.\nLine two."


@pytest.mark.parametrize(
    "name",
    ["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647", "\u0915\u094d\u200d\u0937"],
)
def test_joiners_inside_persian_and_indic_names_are_kept(name):
    NoInvisibleCharacters("Full name")(name)  # ZWNJ in a Persian name, ZWJ after a virama


@pytest.mark.parametrize("name", ["\u200cAlice", "Alice\u200d", "Al \u200c ice", "A\u200c\u200cb"])
def test_joiners_outside_a_word_are_refused(name):
    with pytest.raises(ValidationError, match="U\\+200[CD] ZERO WIDTH"):
        NoInvisibleCharacters("Full name")(name)
