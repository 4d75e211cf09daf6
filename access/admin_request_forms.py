"""Operators write a release's extra questions here, one version of its request form per page.

A version that already has answers is never changed: saving edits to it creates the next
version (access.services.request_forms.form_questions_save) and this page says so. Older
versions are read-only: they are what submitted applications answered.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse

from access.models import RequestAnswer, RequestForm, RequestQuestion
from access.services import request_forms
from access.services.request_forms import QuestionSpec

NEW_VERSION = (
    "Version {old} already has answers, so your changes are version {new}; the answers "
    "given keep the questions of version {old}."
)


class OptionsField(forms.CharField):
    """A select question's options, one per line, stored as a list."""

    widget = forms.Textarea(attrs={"rows": 3, "cols": 30})

    def prepare_value(self, value: Any) -> Any:
        return "\n".join(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:
        text = super().to_python(value) or ""
        return [line.strip() for line in text.splitlines() if line.strip()]


class QuestionForm(forms.ModelForm):
    options = OptionsField(required=False, help_text="Select questions only: one option a line.")

    class Meta:
        model = RequestQuestion
        fields = ["order", "key", "kind", "label", "help_text", "required", "options"]
        widgets = {"help_text": forms.Textarea(attrs={"rows": 2, "cols": 40})}

    def clean(self) -> dict:
        cleaned = super().clean()
        try:
            cleaned["options"] = request_forms.clean_options(
                cleaned.get("kind", ""), cleaned.get("options") or []
            )
        except ValidationError as exc:
            self.add_error("options", exc)
        return cleaned

    def validate_unique(self) -> None:
        # The questions are rewritten as a whole on save; the formset checks keys among them.
        return None


class QuestionFormSet(BaseInlineFormSet):
    def kept_forms(self) -> list[forms.ModelForm]:
        kept = [
            form
            for form in self.forms
            if form.cleaned_data and not form.cleaned_data.get("DELETE", False)
        ]
        return sorted(kept, key=lambda form: form.cleaned_data.get("order") or 0)

    def clean(self) -> None:
        if any(self.errors):
            return
        duplicates = request_forms.duplicate_keys(
            form.cleaned_data["key"] for form in self.kept_forms()
        )
        if duplicates:
            raise ValidationError(
                [request_forms.DUPLICATE_KEY.format(key=key) for key in duplicates],
                code="duplicate_key",
            )

    def specs(self) -> list[QuestionSpec]:
        return [
            QuestionSpec(
                key=data["key"],
                kind=data["kind"],
                label=data["label"],
                help_text=data.get("help_text", ""),
                required=data.get("required", False),
                options=data.get("options") or [],
            )
            for data in (form.cleaned_data for form in self.kept_forms())
        ]


def _editable(obj: RequestForm | None) -> bool:
    return obj is None or request_forms.is_current(obj)


class QuestionInline(admin.TabularInline):
    model = RequestQuestion
    form = QuestionForm
    formset = QuestionFormSet
    extra = 1
    ordering = ("order", "pk")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _editable(obj) and super().has_add_permission(request, obj)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _editable(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _editable(obj) and super().has_delete_permission(request, obj)


@admin.register(RequestForm)
class RequestFormAdmin(admin.ModelAdmin):
    list_display = ("release", "version", "question_count", "answer_count", "created_at")
    list_filter = ("release",)
    inlines = [QuestionInline]

    def get_queryset(self, request: HttpRequest):
        return (
            super()
            .get_queryset(request)
            .select_related("release")
            .annotate(
                _questions=Count("questions", distinct=True),
                _answers=Count("questions__answers", distinct=True),
            )
        )

    def get_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return ("release",) if obj is None else ("release", "version", "created_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return () if obj is None else ("release", "version", "created_at")

    @admin.display(description="questions", ordering="_questions")
    def question_count(self, obj: RequestForm) -> int:
        return obj._questions

    @admin.display(description="answers", ordering="_answers")
    def answer_count(self, obj: RequestForm) -> int:
        return obj._answers

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _editable(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None and RequestAnswer.objects.filter(question__form=obj).exists():
            return False
        return super().has_delete_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: RequestForm, form: Any, change: bool) -> None:
        if not change:
            obj.version = request_forms.next_version(obj.release)
            obj.save()

    def save_related(self, request: HttpRequest, form: Any, formsets: list, change: bool) -> None:
        questions = next(fs for fs in formsets if isinstance(fs, QuestionFormSet))
        saved = request_forms.form_questions_save(form=form.instance, questions=questions.specs())
        # The questions were rewritten as a whole: the history says which the form now has.
        questions.new_objects = list(saved.questions.all())
        questions.changed_objects, questions.deleted_objects = [], []
        if saved.pk != form.instance.pk:
            request._request_form_saved = saved  # response_change opens the new version

    def response_change(self, request: HttpRequest, obj: RequestForm) -> HttpResponse:
        saved = getattr(request, "_request_form_saved", None)
        if saved is None:
            return super().response_change(request, obj)
        messages.info(request, NEW_VERSION.format(old=obj.version, new=saved.version))
        return HttpResponseRedirect(reverse("admin:access_requestform_change", args=[saved.pk]))
