"""Reviewer decisions in the admin: the intermediate forms and the code that runs them.

Every decision goes through a service in access.services.reviews; this module only
collects the reviewer's input, calls the service once per row and reports the outcome.
A ServiceError becomes an error message; the service, not the admin, decides what is
allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import Model
from django.http import HttpRequest
from django.template.response import TemplateResponse

from access.errors import InvalidInput, ServiceError
from access.models import Application
from access.services import reviews

DECISION_TEMPLATE = "admin/access/decision_form.html"


class ReasonForm(forms.Form):
    # Not required here: the service refuses a blank reason with its own message.
    reason = forms.CharField(
        label="Reason (shown to the applicant)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 5, "cols": 80, "required": True}),
    )

    def __init__(self, *args: Any, label: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if label:
            self.fields["reason"].label = label


class NoteForm(forms.Form):
    note = forms.CharField(
        label="Note to the applicant (optional)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
    )


class ApproveForm(NoteForm):
    releases = forms.ModelMultipleChoiceField(
        label="Releases to grant",
        queryset=None,
        required=False,
        widget=forms.CheckboxSelectMultiple,
    )
    field_order = ["releases", "note"]

    def __init__(self, *args: Any, application: Application, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        requested = application.requested_releases.order_by("sort_order", "name")
        self.fields["releases"].queryset = requested
        self.fields["releases"].initial = [release.pk for release in requested]


@dataclass(frozen=True)
class Decision:
    """One reviewer decision: its form, its service call, and how to describe it."""

    name: str
    title: str
    submit: str
    done: str  # past tense, for "Approved application #3."
    run: Callable[[Application, Any, dict[str, Any]], object]
    make_form: Callable[..., forms.Form]
    make_bulk_form: Callable[..., forms.Form]


def _approve(application: Application, reviewer: Any, data: dict[str, Any]) -> object:
    releases = data.get("releases")
    if releases is None:  # bulk: everything the applicant asked for
        releases = list(application.requested_releases.all())
    return reviews.application_approve(
        application=application, reviewer=reviewer, releases=releases, note=data["note"]
    )


def _reason_form(label: str) -> Callable[..., forms.Form]:
    def make(*args: Any, **kwargs: Any) -> forms.Form:
        kwargs.pop("application", None)
        return ReasonForm(*args, label=label, **kwargs)

    return make


DECISIONS: dict[str, Decision] = {
    "approve": Decision(
        name="approve",
        title="Approve",
        submit="Approve and grant the checked releases",
        done="Approved",
        run=_approve,
        make_form=ApproveForm,
        make_bulk_form=NoteForm,
    ),
    "reject": Decision(
        name="reject",
        title="Reject",
        submit="Reject",
        done="Rejected",
        run=lambda a, r, d: reviews.application_reject(
            application=a, reviewer=r, reason=d["reason"]
        ),
        make_form=_reason_form("Reason (shown to the applicant)"),
        make_bulk_form=_reason_form("Reason for all selected (shown to each applicant)"),
    ),
    "request_info": Decision(
        name="request_info",
        title="Request more information",
        submit="Send the question",
        done="Asked for more information on",
        run=lambda a, r, d: reviews.application_request_info(
            application=a, reviewer=r, question=d["reason"]
        ),
        make_form=_reason_form("Question (shown to the applicant)"),
        make_bulk_form=_reason_form("Question for all selected (shown to each applicant)"),
    ),
    "revoke": Decision(
        name="revoke",
        title="Revoke approval",
        submit="Revoke the approval and all its grants",
        done="Revoked the approval of",
        run=lambda a, r, d: reviews.application_revoke(
            application=a, reviewer=r, reason=d["reason"]
        ),
        make_form=_reason_form("Reason (shown to the applicant)"),
        make_bulk_form=_reason_form("Reason for all selected (shown to each applicant)"),
    ),
}


def run_each(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    objects: Iterable[Model],
    run: Callable[[Model], object],
    done: str,
) -> tuple[list[Model], list[tuple[Model, ServiceError]]]:
    """Call `run` per object; a refusal is reported for that row and the others go on."""
    succeeded: list[Model] = []
    failed: list[tuple[Model, ServiceError]] = []
    for obj in objects:
        try:
            run(obj)
        except ServiceError as exc:
            failed.append((obj, exc))
            modeladmin.message_user(request, f"{obj}: {exc}", messages.ERROR)
        else:
            succeeded.append(obj)
    if succeeded:
        names = ", ".join(f"#{obj.pk}" for obj in succeeded)
        noun = (
            modeladmin.opts.verbose_name
            if len(succeeded) == 1
            else modeladmin.opts.verbose_name_plural
        )
        modeladmin.message_user(
            request, f"{done} {len(succeeded)} {noun}: {names}.", messages.SUCCESS
        )
    return succeeded, failed


def only_input_errors(failed: list[tuple[Model, ServiceError]]) -> bool:
    """True when every refusal was about what the reviewer typed, so the form is worth showing again."""
    return bool(failed) and all(isinstance(exc, InvalidInput) for _, exc in failed)


def bulk_page(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset,
    *,
    title: str,
    submit: str,
    make_form: Callable[..., forms.Form],
    run: Callable[[Model, dict[str, Any]], object],
    done: str,
    describe_row: Callable[[Model], str] = str,
) -> TemplateResponse | None:
    """An admin action with an intermediate page: show the form, then run it for every row.

    Returns None (back to the change list) once it ran, unless every row was refused
    for bad input, in which case the form is shown again with what was typed.
    """
    confirmed = request.POST.get("confirm") == "yes"
    form = make_form(request.POST if confirmed else None)
    if confirmed and form.is_valid():
        data = form.cleaned_data
        succeeded, failed = run_each(
            modeladmin, request, list(queryset), lambda obj: run(obj, data), done
        )
        if succeeded or not only_input_errors(failed):
            return None
    context = {
        **modeladmin.admin_site.each_context(request),
        "opts": modeladmin.opts,
        "title": title,
        "submit_label": submit,
        "form": form,
        "rows": [(obj, describe_row(obj)) for obj in queryset],
        "bulk": True,
        "action_name": request.POST.get("action", ""),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "media": modeladmin.media,
    }
    request.current_app = modeladmin.admin_site.name
    return TemplateResponse(request, DECISION_TEMPLATE, context)
