"""Per-release request forms: the extra questions a release asks, and the answers to them.

Versioning: a release's current form is its highest version. Changing the questions of a
version that already has answers creates the next version (`form_questions_save`), so a
submitted application keeps the exact questions it answered. A draft always answers the
current version: on every save and at submit its answers to an older version move to the
question with the same key and kind when they are still valid there, and are dropped
otherwise. Answers to releases no longer requested are dropped too.

The same rules serve the apply page, the API and the admin; messages are constants.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.db.models import Exists, OuterRef, Prefetch, QuerySet
from django_countries import countries

from access import errors
from access.models import Application, QuestionKind, RequestAnswer, RequestForm, RequestQuestion
from access.validators import NoInvisibleCharacters
from weights.models import Release

Kind = QuestionKind

TEXT_MAX = 500
LONG_TEXT_MAX = 5000
URL_MAX = 2000
OPTION_MAX = 200
OPTIONS_MAX = 100

REQUIRED = "This question is required."
REQUIRED_CHECKBOX = "Tick this box; it is required."
NOT_TEXT = "Send the answer as a string."
NOT_BOOLEAN = "Send true or false."
TOO_LONG = "Keep this answer under {limit} characters (it has {count})."
NOT_AN_OPTION = "“{value}” is not one of the options: {options}."
BAD_DATE = "Enter a date as YYYY-MM-DD, e.g. 2025-01-31."
NOT_A_DATE = "{value} is not a date in the calendar."
UNKNOWN_COUNTRY = "“{value}” is not a country code; use ISO 3166-1 alpha-2, e.g. DE or JP."
URL_SCHEME = "Enter a URL starting with http:// or https://."
BAD_URL = "Enter a valid URL, e.g. https://lab.example.edu/people/ada."
NOT_REQUESTED = "You did not request this release; add it to `releases` to answer its questions."
NO_QUESTIONS = "This release asks no extra questions."
UNKNOWN_QUESTION = (
    "This release has no question with this key; its questions are listed at /api/releases/{slug}/."
)
NOT_A_MAPPING = "Send the answers of a release as an object: {question_key: value}."
INVALID_ANSWERS = "Some answers are invalid: {problems}."
INCOMPLETE_ANSWERS = "Answer these required questions before submitting: {questions}."
OPTIONS_ONLY_FOR_SELECT = "Only select questions have options; clear them or make it a select."
SELECT_NEEDS_OPTIONS = "A select question needs at least one option."
DUPLICATE_OPTION = "The option “{option}” is listed twice."
OPTION_TOO_LONG = "Keep each option under {limit} characters."
TOO_MANY_OPTIONS = "A select question takes at most {limit} options."
DUPLICATE_KEY = "The key “{key}” is used by two questions; each key must be unique in a form."
NOT_CURRENT = "Only the current version of a request form can be edited."

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_URL = URLValidator(schemes=["http", "https"], message=BAD_URL)
_OPTION_TEXT = NoInvisibleCharacters("An option")
TEXT_LIMITS = {Kind.TEXT: TEXT_MAX, Kind.LONG_TEXT: LONG_TEXT_MAX, Kind.URL: URL_MAX}

# {release_slug: {question_key: value}}, or error messages in the same shape.
Answers = dict[str, dict[str, Any]]


class AnswersInvalid(errors.InvalidInput):
    """Refused answers; `field_errors` is {slug: {key: [message]}} or {slug: [message]}."""

    def __init__(self, message: str, *, field_errors: dict[str, Any], code: str) -> None:
        super().__init__(message, code=code)
        self.field_errors = field_errors


@dataclass(frozen=True)
class QuestionSpec:
    """A question as an operator writes it, before it belongs to a form version."""

    key: str
    kind: str
    label: str
    help_text: str = ""
    required: bool = False
    options: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, question: RequestQuestion) -> QuestionSpec:
        return cls(
            key=question.key,
            kind=question.kind,
            label=question.label,
            help_text=question.help_text,
            required=question.required,
            options=list(question.options or []),
        )


# --- the questions ------------------------------------------------------------------------


def clean_options(kind: str, options: Sequence[str]) -> list[str]:
    """A question's options, refused with a precise message where they do not fit its kind."""
    options = [option.strip() for option in options if option.strip()]
    if kind != Kind.SELECT:
        if options:
            raise ValidationError(OPTIONS_ONLY_FOR_SELECT, code="options_not_select")
        return []
    if not options:
        raise ValidationError(SELECT_NEEDS_OPTIONS, code="select_without_options")
    if len(options) > OPTIONS_MAX:
        raise ValidationError(TOO_MANY_OPTIONS.format(limit=OPTIONS_MAX), code="too_many_options")
    seen: set[str] = set()
    for option in options:
        _OPTION_TEXT(option)
        if len(option) > OPTION_MAX:
            raise ValidationError(OPTION_TOO_LONG.format(limit=OPTION_MAX), code="option_too_long")
        if option in seen:
            raise ValidationError(DUPLICATE_OPTION.format(option=option), code="duplicate_option")
        seen.add(option)
    return options


def duplicate_keys(keys: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    duplicates: list[str] = []
    for key in keys:
        if key in seen and key not in duplicates:
            duplicates.append(key)
        seen.add(key)
    return duplicates


def _newer_version() -> Exists:
    return Exists(
        RequestForm.objects.filter(release=OuterRef("release"), version__gt=OuterRef("version"))
    )


def current_forms_query(release_ids: Iterable[int]) -> QuerySet[RequestForm]:
    return (
        RequestForm.objects.filter(release_id__in=list(release_ids))
        .exclude(_newer_version())
        .select_related("release")
        .prefetch_related(
            Prefetch("questions", queryset=RequestQuestion.objects.order_by("order", "pk"))
        )
    )


def current_forms(release_ids: Iterable[int]) -> dict[int, RequestForm]:
    """{release id: its current form, questions prefetched} for the releases that have one."""
    return {form.release_id: form for form in current_forms_query(release_ids)}


def current_form(release: Release) -> RequestForm | None:
    return current_forms([release.pk]).get(release.pk)


def is_current(form: RequestForm) -> bool:
    return not RequestForm.objects.filter(
        release_id=form.release_id, version__gt=form.version
    ).exists()


def next_version(release: Release) -> int:
    latest = RequestForm.objects.filter(release=release).order_by("-version").first()
    return 1 if latest is None else latest.version + 1


@transaction.atomic
def request_form_create(*, release: Release, questions: Sequence[QuestionSpec] = ()) -> RequestForm:
    # Locking the release serialises two operators adding a version at the same time.
    Release.objects.select_for_update().get(pk=release.pk)
    form = RequestForm.objects.create(release=release, version=next_version(release))
    _questions_create(form, questions)
    return form


@transaction.atomic
def form_questions_save(*, form: RequestForm, questions: Sequence[QuestionSpec]) -> RequestForm:
    """Give the current form these questions; returns the form that now holds them.

    A version with answers stays as it was and the questions become the next version;
    a version nobody answered yet is changed in place.
    """
    form = RequestForm.objects.select_for_update().get(pk=form.pk)
    if not is_current(form):
        raise errors.InvalidInput(NOT_CURRENT, code="form_not_current")
    existing = [QuestionSpec.of(q) for q in form.questions.order_by("order", "pk")]
    if existing == list(questions):
        return form
    if RequestAnswer.objects.filter(question__form=form).exists():
        form = RequestForm.objects.create(release=form.release, version=form.version + 1)
    else:
        form.questions.all().delete()
    _questions_create(form, questions)
    return form


def _questions_create(form: RequestForm, questions: Sequence[QuestionSpec]) -> None:
    duplicates = duplicate_keys(spec.key for spec in questions)
    if duplicates:
        raise errors.InvalidInput(DUPLICATE_KEY.format(key=duplicates[0]), code="duplicate_key")
    rows = []
    for order, spec in enumerate(questions):
        question = RequestQuestion(
            form=form,
            order=order,
            key=spec.key,
            kind=spec.kind,
            label=spec.label,
            help_text=spec.help_text,
            required=spec.required,
            options=clean_options(spec.kind, spec.options),
        )
        question.full_clean(exclude=["form"], validate_unique=False)
        rows.append(question)
    RequestQuestion.objects.bulk_create(rows)


# --- one answer ---------------------------------------------------------------------------


def clean_answer(question: RequestQuestion, raw: Any) -> Any:
    """The value to store for `raw`, None for no answer; ValidationError with the reason.

    Whether a required question is answered is checked at submit, not here: drafts may
    be incomplete.
    """
    if question.kind == Kind.CHECKBOX:
        if raw is None:
            return None
        if not isinstance(raw, bool):
            raise ValidationError(NOT_BOOLEAN, code="not_boolean")
        return True if raw else None
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValidationError(NOT_TEXT, code="not_text")
    value = raw.strip()
    if not value:
        return None
    NoInvisibleCharacters(question.label, multiline=question.kind == Kind.LONG_TEXT)(value)
    limit = TEXT_LIMITS.get(question.kind, OPTION_MAX)
    if len(value) > limit:
        raise ValidationError(TOO_LONG.format(limit=limit, count=len(value)), code="too_long")
    return _KIND_CHECKS.get(question.kind, _as_is)(question, value)


def _as_is(question: RequestQuestion, value: str) -> str:
    return value


def _select(question: RequestQuestion, value: str) -> str:
    if value not in question.options:
        options = ", ".join(f"“{option}”" for option in question.options)
        raise ValidationError(
            NOT_AN_OPTION.format(value=value, options=options), code="not_an_option"
        )
    return value


def _date(question: RequestQuestion, value: str) -> str:
    if not _ISO_DATE.match(value):
        raise ValidationError(BAD_DATE, code="bad_date")
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValidationError(NOT_A_DATE.format(value=value), code="bad_date") from None


def _country(question: RequestQuestion, value: str) -> str:
    code = value.upper()
    if code not in dict(countries):
        raise ValidationError(UNKNOWN_COUNTRY.format(value=value), code="unknown_country")
    return code


def _url(question: RequestQuestion, value: str) -> str:
    if not value.lower().startswith(("http://", "https://")):
        raise ValidationError(URL_SCHEME, code="url_scheme")
    _URL(value)
    return value


_KIND_CHECKS = {Kind.SELECT: _select, Kind.DATE: _date, Kind.COUNTRY: _country, Kind.URL: _url}


# --- an application's answers -------------------------------------------------------------


def _requested(application: Application) -> dict[str, Release]:
    return {release.slug: release for release in application.requested_releases.all()}


def _locked_current_forms(releases: Iterable[Release]) -> dict[int, RequestForm]:
    """Current forms, locked so that an operator's edit waits for this save (and vice versa)."""
    ids = [release.pk for release in releases]
    locked = RequestForm.objects.filter(release_id__in=ids).exclude(_newer_version())
    list(locked.select_for_update().values_list("pk", flat=True))
    return current_forms(ids)


def answers_align(application: Application, forms: Mapping[int, RequestForm]) -> None:
    """Make a draft's answers answer the current forms of the releases it requests."""
    questions = {
        (form.release_id, q.key): q for form in forms.values() for q in form.questions.all()
    }
    answered: set[int] = set()
    stale: list[RequestAnswer] = []
    answers = RequestAnswer.objects.filter(application=application).select_related("question__form")
    for answer in answers:
        form = forms.get(answer.question.form.release_id)
        if form is not None and answer.question.form_id == form.pk:
            answered.add(answer.question_id)
        else:
            stale.append(answer)
    for answer in stale:
        target = questions.get((answer.question.form.release_id, answer.question.key))
        if target is None or target.kind != answer.question.kind or target.pk in answered:
            answer.delete()
            continue
        try:
            value = clean_answer(target, answer.value)
        except ValidationError:
            value = None
        if value is None:
            answer.delete()
            continue
        answer.question, answer.value = target, value
        answer.save(update_fields=["question", "value"])
        answered.add(target.pk)


def answers_save(*, application: Application, answers: Mapping[str, Any] | None) -> None:
    """Store a draft's answers {release_slug: {question_key: value}} (None: leave them).

    Only the questions given change; an empty value (or false) clears an answer. Nothing is
    written unless every answer is valid.
    """
    requested = _requested(application)
    forms = _locked_current_forms(requested.values())
    answers_align(application, forms)
    if not answers:
        return
    problems: dict[str, Any] = {}
    cleaned: dict[RequestQuestion, Any] = {}
    for slug, given in answers.items():
        release = requested.get(slug)
        form = forms.get(release.pk) if release is not None else None
        if release is None:
            problems[slug] = [NOT_REQUESTED]
        elif not isinstance(given, Mapping):
            problems[slug] = [NOT_A_MAPPING]
        elif given and form is None:
            problems[slug] = [NO_QUESTIONS]
        else:
            by_key = {q.key: q for q in form.questions.all()} if form else {}
            for key, raw in given.items():
                question = by_key.get(key)
                if question is None:
                    problems.setdefault(slug, {})[key] = [UNKNOWN_QUESTION.format(slug=slug)]
                    continue
                try:
                    cleaned[question] = clean_answer(question, raw)
                except ValidationError as exc:
                    problems.setdefault(slug, {})[key] = exc.messages
    if problems:
        raise AnswersInvalid(
            INVALID_ANSWERS.format(problems=_describe(problems)),
            field_errors=problems,
            code="invalid_answers",
        )
    for question, value in cleaned.items():
        if value is None:
            RequestAnswer.objects.filter(application=application, question=question).delete()
        else:
            RequestAnswer.objects.update_or_create(
                application=application, question=question, defaults={"value": value}
            )


def required_answers_check(application: Application) -> None:
    """At submit: every required question of every requested release is answered."""
    requested = _requested(application)
    forms = _locked_current_forms(requested.values())
    answers_align(application, forms)
    answered = set(
        RequestAnswer.objects.filter(application=application).values_list("question_id", flat=True)
    )
    missing: dict[str, Any] = {}
    names: list[str] = []
    for form in sorted(forms.values(), key=lambda f: (f.release.sort_order, f.release.name)):
        for question in form.questions.all():
            if question.required and question.pk not in answered:
                message = REQUIRED_CHECKBOX if question.kind == Kind.CHECKBOX else REQUIRED
                missing.setdefault(form.release.slug, {})[question.key] = [message]
                names.append(f"{form.release.name}: {question.label}")
    if missing:
        raise AnswersInvalid(
            INCOMPLETE_ANSWERS.format(questions="; ".join(names)),
            field_errors=missing,
            code="answers_incomplete",
        )


def _describe(problems: Mapping[str, Any]) -> str:
    parts = []
    for slug, found in problems.items():
        if isinstance(found, Mapping):
            parts += [f"{slug}.{key}: {' '.join(msgs)}" for key, msgs in found.items()]
        else:
            parts.append(f"{slug}: {' '.join(found)}")
    return "; ".join(parts)


# --- reading answers ----------------------------------------------------------------------


def answers_for(application: Application) -> Answers:
    """{release_slug: {question_key: value}}: what the policy engine and the export read."""
    return answers_for_many([application])[application.pk]


def answers_for_many(applications: Iterable[Application]) -> dict[int, Answers]:
    """answers_for of each application, in one query."""
    result: dict[int, Answers] = {application.pk: {} for application in applications}
    rows = RequestAnswer.objects.filter(application_id__in=list(result)).values_list(
        "application_id", "question__form__release__slug", "question__key", "value"
    )
    for application_id, slug, key, value in rows.order_by(
        "application_id", "question__form__release__slug", "question__order"
    ):
        result[application_id].setdefault(slug, {})[key] = value
    return result


@dataclass(frozen=True)
class AnsweredQuestion:
    question: RequestQuestion
    value: Any  # None: not answered

    @property
    def display(self) -> str:
        """The answer as a reader wants it: "Yes" for a ticked box, a country by name."""
        if self.value is None:
            return ""
        if self.question.kind == Kind.CHECKBOX:
            return "Yes" if self.value else "No"
        if self.question.kind == Kind.COUNTRY:
            return f"{countries.name(self.value) or self.value} ({self.value})"
        return str(self.value)


@dataclass(frozen=True)
class ReleaseAnswers:
    release: Release
    form: RequestForm
    items: list[AnsweredQuestion]


def answer_sheets(application: Application) -> list[ReleaseAnswers]:
    """Per requested release, the questions of the version answered (the current one when
    none was) with the answers given: what the reviewer and the applicant read."""
    answers = list(
        RequestAnswer.objects.filter(application=application).select_related("question__form")
    )
    by_question = {answer.question_id: answer.value for answer in answers}
    answered_forms = {
        answer.question.form.release_id: answer.question.form_id for answer in answers
    }
    releases = list(application.requested_releases.all())
    current = current_forms(r.pk for r in releases if r.pk not in answered_forms)
    form_ids = set(answered_forms.values()) | {form.pk for form in current.values()}
    forms = {
        form.release_id: form
        for form in RequestForm.objects.filter(pk__in=form_ids).prefetch_related(
            Prefetch("questions", queryset=RequestQuestion.objects.order_by("order", "pk"))
        )
    }
    sheets = []
    for release in releases:
        form = forms.get(release.pk)
        if form is None:
            continue
        items = [AnsweredQuestion(q, by_question.get(q.pk)) for q in form.questions.all()]
        if items:
            sheets.append(ReleaseAnswers(release=release, form=form, items=items))
    return sheets
