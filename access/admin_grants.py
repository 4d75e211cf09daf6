"""Grant pages of the admin: give a release directly, revoke one grant.

Both are intermediate pages (the decision form template) over
access.services.direct_grants; a refusal from the service is shown on the form and
nothing is written.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from access import admin_actions
from access.admin_base import ReadOnlyAdmin
from access.errors import ServiceError
from access.models import Grant, GrantEvent
from access.services import direct_grants
from weights.models import Release

NO_ACCOUNT = "No account has this email address."
# The form field a refusal is about; other refusals are shown above the form.
FIELD_OF_REFUSAL = {"reason_required": "reason", "inactive": "account", "own_grant": "account"}


class DirectGrantForm(forms.Form):
    account = forms.EmailField(
        label="Account email",
        help_text="The email address of an existing account (any case).",
        widget=forms.EmailInput(attrs={"size": 40, "autofocus": True}),
    )
    release = forms.ModelChoiceField(queryset=Release.objects.order_by("sort_order", "name"))
    # Not required here: the service refuses a blank reason with its own message.
    reason = forms.CharField(
        label="Reason (kept with the grant)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 4, "cols": 80, "required": True}),
    )

    def clean_account(self) -> Any:
        email = self.cleaned_data["account"]
        user = get_user_model().objects.filter(email__iexact=email).order_by("pk").first()
        if user is None:
            raise forms.ValidationError(NO_ACCOUNT)
        return user


def _page(modeladmin: admin.ModelAdmin, request: HttpRequest, **context: Any) -> TemplateResponse:
    request.current_app = modeladmin.admin_site.name
    return TemplateResponse(
        request,
        admin_actions.DECISION_TEMPLATE,
        {
            **modeladmin.admin_site.each_context(request),
            "opts": modeladmin.opts,
            "bulk": False,
            "rows": [],
            **context,
        },
    )


def grant_directly_view(modeladmin: admin.ModelAdmin, request: HttpRequest) -> HttpResponse:
    if not modeladmin.has_decide_permission(request):
        raise PermissionDenied
    posted = request.method == "POST"
    form = DirectGrantForm(request.POST if posted else None)
    if posted and form.is_valid():
        data = form.cleaned_data
        try:
            grant = direct_grants.grant_direct(
                reviewer=request.user,
                user=data["account"],
                release=data["release"],
                reason=data["reason"],
            )
        except ServiceError as exc:
            form.add_error(FIELD_OF_REFUSAL.get(exc.code), str(exc))
        else:
            modeladmin.message_user(request, f"Granted {grant}.", messages.SUCCESS)
            return HttpResponseRedirect(reverse("admin:access_grant_change", args=[grant.pk]))
    return _page(
        modeladmin,
        request,
        title="Grant a release directly",
        submit_label="Grant",
        form=form,
    )


def grant_revoke_view(
    modeladmin: admin.ModelAdmin, request: HttpRequest, object_id: int
) -> HttpResponse:
    if not modeladmin.has_decide_permission(request):
        raise PermissionDenied
    grant = modeladmin.get_object(request, str(object_id))
    if grant is None:
        return modeladmin._get_obj_does_not_exist_redirect(request, modeladmin.opts, str(object_id))
    change_url = reverse("admin:access_grant_change", args=[grant.pk])
    posted = request.method == "POST"
    form = admin_actions.ReasonForm(
        request.POST if posted else None, label="Reason (shown to the grant's holder)"
    )
    if posted and form.is_valid():
        try:
            direct_grants.grant_revoke_one(
                grant=grant, reviewer=request.user, reason=form.cleaned_data["reason"]
            )
        except ServiceError as exc:
            form.add_error(FIELD_OF_REFUSAL.get(exc.code), str(exc))
        else:
            modeladmin.message_user(request, f"Revoked {grant}.", messages.SUCCESS)
            return HttpResponseRedirect(change_url)
    return _page(
        modeladmin,
        request,
        title=f"Revoke this grant: {grant}",
        submit_label="Revoke this grant",
        form=form,
        original=grant,
        change_url=change_url,
        rows=[(grant, _describe(grant))],
    )


def _describe(grant: Grant) -> str:
    origin = f"application #{grant.application_id}" if grant.application_id else "direct grant"
    return f"{grant} ({origin}, granted {grant.created_at:%Y-%m-%d})"


def revoke_selected_page(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset
) -> TemplateResponse | None:
    """The "Revoke selected grants" action: one reason, each grant revoked on its own."""
    return admin_actions.bulk_page(
        modeladmin,
        request,
        queryset.select_related("user", "release"),
        title="Revoke the selected grants",
        submit="Revoke",
        make_form=admin_actions.ReasonForm,
        run=lambda grant, data: direct_grants.grant_revoke_one(
            grant=grant, reviewer=request.user, reason=data["reason"]
        ),
        done="Revoked",
    )


@admin.register(GrantEvent)
class GrantEventAdmin(ReadOnlyAdmin):
    """Evidence, like the application timeline: read-only."""

    list_display = ("created_at", "grant", "action", "actor", "reason")
    list_filter = ("action",)
    search_fields = ("grant__user__email", "grant__release__slug", "actor__email", "reason")
    list_select_related = ("grant__user", "grant__release", "actor")
    date_hierarchy = "created_at"
