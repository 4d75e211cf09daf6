"""API bodies of per-release request forms: the questions a release asks and the answers.

Requests send answers as an object keyed by release slug, then question key:
`{"llama-7b": {"lab_website": "https://lab.example.edu", "agree_terms": true}}`; errors
come back under `answers.<slug>.<key>`. Responses list them per release, in the form's
order, with each question's label.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from access.models import QuestionKind, RequestForm, RequestQuestion
from access.services.request_forms import AnswersInvalid, ReleaseAnswers, answer_sheets

ANSWER_VALUE_SCHEMA = {
    "oneOf": [{"type": "string"}, {"type": "boolean"}],
    "nullable": True,
    "description": "A string for text, long_text, select (one of the options), date "
    "(YYYY-MM-DD), country (ISO 3166-1 alpha-2) and url (http or https); true or false "
    "for a checkbox. null, an empty string or false clears the answer.",
}
ANSWERS_SCHEMA = {
    "type": "object",
    "description": "Answers to the extra questions of the requested releases: "
    "{release_slug: {question_key: value}}. A release's questions are in "
    "`release_retrieve` (`request_form`). Only the questions given change. Required "
    "questions are checked at submit; errors name `answers.<slug>.<key>`.",
    "additionalProperties": {"type": "object", "additionalProperties": ANSWER_VALUE_SCHEMA},
    "example": {"llama-7b": {"lab_website": "https://lab.example.edu", "agree_terms": True}},
}


@extend_schema_field(ANSWERS_SCHEMA)
class AnswersField(serializers.DictField):
    """The shape only ({slug: {key: value}}); access.services.request_forms judges the values."""

    child = serializers.DictField(child=serializers.JSONField(allow_null=True), allow_empty=True)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)


class RequestQuestionSerializer(serializers.ModelSerializer):
    kind = serializers.ChoiceField(choices=QuestionKind.choices)
    options = serializers.ListField(
        child=serializers.CharField(), help_text="For select: the accepted values; else []."
    )

    class Meta:
        model = RequestQuestion
        fields = ["key", "kind", "label", "help_text", "required", "options"]


class RequestFormSerializer(serializers.ModelSerializer):
    version = serializers.IntegerField(
        help_text="Answers keep the version they answered; a new version replaces the questions."
    )
    questions = RequestQuestionSerializer(many=True, help_text="In the order the form shows them.")

    class Meta:
        model = RequestForm
        fields = ["version", "questions"]


class QuestionAnswerSerializer(serializers.Serializer):
    key = serializers.CharField()
    label = serializers.CharField()
    kind = serializers.ChoiceField(choices=QuestionKind.choices)
    required = serializers.BooleanField()
    value = serializers.JSONField(
        allow_null=True, help_text="As stored (see `answers` of the request); null: unanswered."
    )


class ReleaseAnswersSerializer(serializers.Serializer):
    release = serializers.SlugField(help_text="The release's slug.")
    form_version = serializers.IntegerField(help_text="The request form version answered.")
    answers = QuestionAnswerSerializer(many=True)

    def to_representation(self, sheet: ReleaseAnswers) -> dict:
        return {
            "release": sheet.release.slug,
            "form_version": sheet.form.version,
            "answers": [
                {
                    "key": item.question.key,
                    "label": item.question.label,
                    "kind": item.question.kind,
                    "required": item.question.required,
                    "value": item.value,
                }
                for item in sheet.items
            ],
        }


class AnswersMixin(serializers.Serializer):
    """`answers` on an application response: per requested release that asks questions."""

    answers = serializers.SerializerMethodField(
        help_text="Each requested release's extra questions with your answers (null when "
        "unanswered), in the version of the form answered."
    )

    @extend_schema_field(ReleaseAnswersSerializer(many=True))
    def get_answers(self, obj: Any) -> list[dict]:
        return ReleaseAnswersSerializer(answer_sheets(obj), many=True).data


@contextmanager
def answers_as_field_errors() -> Iterator[None]:
    """Refused answers as a 400 whose `errors` name `answers.<slug>.<key>`."""
    try:
        yield
    except AnswersInvalid as exc:
        raise serializers.ValidationError({"answers": exc.field_errors}, code=exc.code) from exc
