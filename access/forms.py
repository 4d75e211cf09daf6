from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django_countries import countries

from access.models import Application, QuestionKind, RequestAnswer, RequestQuestion
from access.services import request_forms
from access.services.applications import EDITABLE_FIELDS
from access.tokens import TOKEN_NAME
from access.validators import ANSWER_TEXT
from weights.models import Release


class ApplicationForm(forms.ModelForm):
    requested_releases = forms.ModelMultipleChoiceField(
        queryset=Release.objects.all(),
        widget=forms.CheckboxSelectMultiple,
        required=False,
        label="Releases requested",
        error_messages={"invalid_choice": "%(value)s is not a release in the catalogue."},
    )
    accept_license = forms.BooleanField(
        required=False, label="I have read and accept the license above"
    )

    class Meta:
        model = Application
        fields = [*EDITABLE_FIELDS, "requested_releases"]
        widgets = {
            "intended_use": forms.Textarea(attrs={"rows": 6}),
            "publications": forms.Textarea(attrs={"rows": 3}),
        }
        help_texts = {
            "institutional_email": "An address at your institution; reviewers use it to confirm affiliation.",
            "orcid": "Optional, e.g. 0000-0002-1825-0097.",
            "intended_use": "What you will study with the weights, and how you will share results.",
        }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from django.conf import settings

        self.fields["intended_use"].widget.attrs["maxlength"] = (
            settings.PORTAL_INTENDED_USE_MAX_LENGTH
        )
        self.question_groups = self._add_question_fields()
        self.answers: dict[str, dict[str, Any]] = {}

    def service_fields(self) -> dict:
        return {name: self.cleaned_data.get(name, "") for name in EDITABLE_FIELDS}

    def _add_question_fields(self) -> list[QuestionGroup]:
        """A field per question of every release's current form, grouped by release."""
        releases = list(self.fields["requested_releases"].queryset)
        forms_by_release = request_forms.current_forms(release.pk for release in releases)
        given = _given_answers(self.instance)
        groups = []
        for release in releases:
            form = forms_by_release.get(release.pk)
            questions = list(form.questions.all()) if form is not None else []
            if not questions:
                continue
            names = []
            for question in questions:
                name = answer_field_name(release.pk, question.key)
                self.fields[name] = question_field(question)
                if (release.pk, question.key) in given:
                    self.initial[name] = given[release.pk, question.key]
                names.append(name)
            groups.append(
                QuestionGroup(release=release, questions=questions, names=names, form=self)
            )
        return groups

    def clean(self) -> dict:
        cleaned = super().clean()
        selected = {release.pk for release in cleaned.get("requested_releases") or []}
        for group in self.question_groups:
            if group.release.pk not in selected:
                for name in group.names:  # questions of releases not chosen are ignored
                    self._errors.pop(name, None)
                continue
            answers = self.answers.setdefault(group.release.slug, {})
            for question, name in zip(group.questions, group.names, strict=True):
                try:
                    answers[question.key] = request_forms.clean_answer(question, cleaned.get(name))
                except ValidationError as exc:
                    self.add_error(name, exc)
        return cleaned

    def add_answer_errors(self, field_errors: Mapping[str, Any]) -> None:
        """A service's refusal of answers ({slug: {key: [message]}}) on the fields it names."""
        names = {
            (group.release.slug, question.key): name
            for group in self.question_groups
            for question, name in zip(group.questions, group.names, strict=True)
        }
        for slug, found in field_errors.items():
            if not isinstance(found, Mapping):
                self.add_error(None, [f"{slug}: {message}" for message in found])
                continue
            for key, messages in found.items():
                name = names.get((slug, key))
                if name is not None and name in self.fields:
                    self.add_error(name, list(messages))
                else:
                    self.add_error(None, [f"{slug}.{key}: {message}" for message in messages])


def answer_field_name(release_id: int, key: str) -> str:
    # Release ids are digits, so the first underscore ends the id: names never collide.
    return f"q{release_id}_{key}"


@dataclass
class QuestionGroup:
    """One release's extra questions on the apply page."""

    release: Release
    questions: list[RequestQuestion]
    names: list[str]
    form: forms.Form

    def fields(self) -> list[forms.BoundField]:
        return [self.form[name] for name in self.names]


def _given_answers(application: Application) -> dict[tuple[int, str], Any]:
    """A draft's answers by (release id, key), older form versions included (matched by key)."""
    if application.pk is None:
        return {}
    rows = RequestAnswer.objects.filter(application=application).values_list(
        "question__form__release_id", "question__key", "value", "question__form__version"
    )
    given: dict[tuple[int, str], Any] = {}
    for release_id, key, value, _version in rows.order_by("question__form__version"):
        given[release_id, key] = value  # the newest version's answer wins
    return given


class RawAnswerField(forms.Field):
    """The text as typed; access.services.request_forms.clean_answer judges it, so the
    page and the API give the same messages."""

    def to_python(self, value: Any) -> Any:
        return value if value not in self.empty_values else None


def question_field(question: RequestQuestion) -> forms.Field:
    common = {"label": question.label, "help_text": question.help_text, "required": False}
    kind = question.kind
    if kind == QuestionKind.CHECKBOX:
        field: forms.Field = forms.BooleanField(**common)
    elif kind == QuestionKind.SELECT:
        choices = [("", "—"), *((option, option) for option in question.options)]
        field = RawAnswerField(widget=forms.Select(choices=choices), **common)
    elif kind == QuestionKind.COUNTRY:
        field = RawAnswerField(widget=forms.Select(choices=[("", "—"), *countries]), **common)
    elif kind == QuestionKind.DATE:
        field = RawAnswerField(widget=forms.DateInput(attrs={"type": "date"}), **common)
    elif kind == QuestionKind.LONG_TEXT:
        limit = request_forms.LONG_TEXT_MAX
        field = RawAnswerField(
            widget=forms.Textarea(attrs={"rows": 4, "maxlength": limit}), **common
        )
    elif kind == QuestionKind.URL:
        field = RawAnswerField(
            widget=forms.URLInput(attrs={"maxlength": request_forms.URL_MAX}), **common
        )
    else:
        field = RawAnswerField(
            widget=forms.TextInput(attrs={"maxlength": request_forms.TEXT_MAX}), **common
        )
    field.answer_required = question.required  # the page marks it with *; enforced at submit
    return field


class AnswerForm(forms.Form):
    answer = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5}),
        max_length=5000,
        strip=True,
        validators=[ANSWER_TEXT],
    )


class LicenseAcceptForm(forms.Form):
    accept = forms.BooleanField(required=True, label="I have read and accept this license")


LIFETIME_CHOICES = (1, 7, 30, 90)


class ApiTokenForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        help_text="What will use it, e.g. “lab cluster” or “CI script”.",
        validators=[TOKEN_NAME],
    )
    days = forms.TypedChoiceField(coerce=int, label="Expires after")

    def __init__(self, *args, max_days: int, default_days: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        choices = [d for d in LIFETIME_CHOICES if d <= max_days] or [max_days]
        self.fields["days"].choices = [(d, f"{d} day{'s' if d > 1 else ''}") for d in choices]
        self.fields["days"].initial = min(default_days, max(choices))
