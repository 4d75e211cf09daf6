"""The reviewer's admin: a queue of applications, decided case by case.

Reviewers never edit what an applicant wrote; they decide through the services in
access.services.reviews, from the change page or as actions on selected rows.
Decisions need the access.decide_application permission.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django_countries import countries

from access import admin_actions
from access.errors import InvalidInput, ServiceError
from access.models import (
    ApiToken,
    Application,
    ApplicationEvent,
    Grant,
    LicenseAcceptance,
    LicenseVersion,
    Notification,
)
from access.selectors import review_queue, screening_flags
from access.services import reviews
from access.services.licenses import license_publish
from access.services.notifications import outbox_retry

Status = Application.Status


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records that are evidence: visible to reviewers, changed only by services."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class DecidePermissionMixin:
    def has_decide_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("access.decide_application")


class CountryListFilter(admin.SimpleListFilter):
    """Only the countries that occur in the queue, by name, not all 250."""

    title = "country"
    parameter_name = "country"

    def lookups(self, request, model_admin):
        codes = model_admin.get_queryset(request).order_by().values_list("country", flat=True)
        return sorted(
            ((code, countries.name(code)) for code in set(codes) if code), key=lambda item: item[1]
        )

    def queryset(self, request, queryset):
        return queryset.filter(country=self.value()) if self.value() else queryset


class UnsetDateFilter(admin.SimpleListFilter):
    """Two choices on whether a date field is still empty, e.g. active/revoked, unsent/sent."""

    field: str
    unset_label: str
    set_label: str

    def lookups(self, request, model_admin):
        return (("no", self.unset_label), ("yes", self.set_label))

    def queryset(self, request, queryset):
        if self.value() in ("no", "yes"):
            return queryset.filter(**{f"{self.field}__isnull": self.value() == "no"})
        return queryset


class GrantStateFilter(UnsetDateFilter):
    title, parameter_name = "state", "revoked"
    field, unset_label, set_label = "revoked_at", "Active", "Revoked"


class SentFilter(admin.SimpleListFilter):
    """Outbox rows by state: pending (will be tried again), sent, or failed for good."""

    title, parameter_name = "delivery", "sent"

    def lookups(self, request, model_admin):
        return (("no", "Pending"), ("yes", "Sent"), ("failed", "Failed"))

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.filter(sent_at__isnull=True, failed_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(sent_at__isnull=False)
        if self.value() == "failed":
            return queryset.filter(sent_at__isnull=True, failed_at__isnull=False)
        return queryset


@admin.register(Application)
class ApplicationAdmin(DecidePermissionMixin, ReadOnlyAdmin):
    change_form_template = "admin/access/application/change_form.html"
    list_display = (
        "id",
        "full_name",
        "applicant_email",
        "affiliation",
        "organisation_type",
        "country",
        "requested",
        "status",
        "submitted_at",
        "flags",
    )
    list_display_links = ("id", "full_name")
    list_filter = ("status", "organisation_type", CountryListFilter, "requested_releases")
    search_fields = ("full_name", "applicant__email", "institutional_email", "affiliation")
    ordering = ("submitted_at", "pk")
    list_per_page = 50
    actions = ("approve_selected", "reject_selected", "request_info_selected", "revoke_selected")
    fieldsets = (
        (
            "Applicant",
            {
                "fields": (
                    "applicant_email",
                    "full_name",
                    "institutional_email",
                    "affiliation",
                    "organisation_type",
                    "country",
                    "role",
                )
            },
        ),
        (
            "Publications and profiles",
            {"fields": ("orcid", "scholar_url", "homepage_url", "publications")},
        ),
        ("Request", {"fields": ("intended_use", "requested_releases", "license_acceptance")}),
        (
            "Status",
            {"fields": ("status", "submitted_at", "decided_at", "created_at", "updated_at")},
        ),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return tuple(field for _, options in self.fieldsets for field in options["fields"])

    def get_queryset(self, request: HttpRequest):
        # Drafts are the applicant's private work in progress, not part of the queue.
        return review_queue()

    @admin.display(description="applicant email", ordering="applicant__email")
    def applicant_email(self, obj: Application) -> str:
        return obj.applicant.email

    @admin.display(description="requested releases")
    def requested(self, obj: Application) -> str:
        return ", ".join(release.name for release in obj.requested_releases.all())

    @admin.display(description="screening flags")
    def flags(self, obj: Application) -> str:
        found = screening_flags(obj)
        if not found:
            return "—"
        return format_html(
            '<strong class="screening-flags" title="{}">⚑ {}</strong>',
            "\n".join(flag.message for flag in found),
            ", ".join(flag.code.replace("_", " ") for flag in found),
        )

    # --- the change page -------------------------------------------------------

    def render_change_form(
        self, request: HttpRequest, context: dict, add=False, change=False, form_url="", obj=None
    ) -> HttpResponse:
        if obj is not None:
            context.update(
                screening_flags=screening_flags(obj),
                events=obj.events.select_related("actor"),
                grants=obj.grants.select_related(
                    "release", "license_version", "granted_by", "revoked_by"
                ),
                decision_links=self.decision_links(request, obj),
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def decision_links(self, request: HttpRequest, obj: Application) -> list[tuple[str, str]]:
        if not self.has_decide_permission(request):
            return []
        offered = []
        if obj.status in reviews.DECIDABLE:
            offered += ["approve", "reject"]
        if obj.status == Status.SUBMITTED:
            offered.append("request_info")
        if obj.status == Status.APPROVED:
            offered.append("revoke")
        return [
            (
                admin_actions.DECISIONS[name].title,
                reverse(f"admin:access_application_{name}", args=[obj.pk]),
            )
            for name in offered
        ]

    def get_urls(self):
        view = self.admin_site.admin_view(self.decision_view)
        decisions = [
            path(
                f"<int:object_id>/{name.replace('_', '-')}/",
                view,
                {"decision": name},
                name=f"access_application_{name}",
            )
            for name in admin_actions.DECISIONS
        ]
        return decisions + super().get_urls()

    def decision_view(self, request: HttpRequest, object_id: int, decision: str) -> HttpResponse:
        """The intermediate page for one decision on one application."""
        if not self.has_decide_permission(request):
            raise PermissionDenied
        application = self.get_object(request, str(object_id))
        if application is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, str(object_id))
        spec = admin_actions.DECISIONS[decision]
        change_url = reverse("admin:access_application_change", args=[application.pk])
        posted = request.method == "POST"
        form = spec.make_form(request.POST if posted else None, application=application)
        if posted and form.is_valid():
            try:
                spec.run(application, request.user, form.cleaned_data)
            except ServiceError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                if not isinstance(exc, InvalidInput):  # bad input: show the form again
                    return HttpResponseRedirect(change_url)
            else:
                self.message_user(request, f"{spec.done} {application}.", messages.SUCCESS)
                return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"{spec.title}: {application}",
            "submit_label": spec.submit,
            "form": form,
            "original": application,
            "change_url": change_url,
            "rows": [(application, str(application))],
            "screening_flags": screening_flags(application),
            "bulk": False,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, admin_actions.DECISION_TEMPLATE, context)

    # --- actions on selected rows --------------------------------------------

    def _bulk(self, request: HttpRequest, queryset, name: str, title: str):
        spec = admin_actions.DECISIONS[name]
        return admin_actions.bulk_page(
            self,
            request,
            queryset,
            title=title,
            submit=spec.submit if name != "approve" else "Approve all requested releases",
            make_form=spec.make_bulk_form,
            run=lambda obj, data: spec.run(obj, request.user, data),
            done=spec.done,
            describe_row=lambda obj: f"{obj} — {self.requested(obj)} ({obj.get_status_display()})",
        )

    @admin.action(description="Approve selected (all requested releases)…", permissions=["decide"])
    def approve_selected(self, request: HttpRequest, queryset):
        return self._bulk(request, queryset, "approve", "Approve the selected applications")

    @admin.action(description="Reject selected (one reason for all)…", permissions=["decide"])
    def reject_selected(self, request: HttpRequest, queryset):
        return self._bulk(request, queryset, "reject", "Reject the selected applications")

    @admin.action(description="Request more information on selected…", permissions=["decide"])
    def request_info_selected(self, request: HttpRequest, queryset):
        return self._bulk(request, queryset, "request_info", "Ask the selected applicants")

    @admin.action(description="Revoke the approval of selected…", permissions=["decide"])
    def revoke_selected(self, request: HttpRequest, queryset):
        return self._bulk(request, queryset, "revoke", "Revoke the selected approvals")


@admin.register(ApplicationEvent)
class ApplicationEventAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "application",
        "action",
        "actor",
        "from_status",
        "to_status",
        "short_message",
    )
    list_filter = ("action", "to_status")
    search_fields = (
        "application__full_name",
        "application__applicant__email",
        "actor__email",
        "message",
    )
    list_select_related = ("application", "actor")
    date_hierarchy = "created_at"

    @admin.display(description="message")
    def short_message(self, obj: ApplicationEvent) -> str:
        return obj.message if len(obj.message) <= 80 else obj.message[:79] + "…"


@admin.register(Grant)
class GrantAdmin(DecidePermissionMixin, ReadOnlyAdmin):
    list_display = (
        "id",
        "user",
        "release",
        "application",
        "license_version",
        "granted_by",
        "created_at",
        "revoked_at",
    )
    list_filter = (GrantStateFilter, "release", "license_version")
    search_fields = ("user__email", "application__full_name", "release__slug")
    list_select_related = ("user", "release", "application", "license_version", "granted_by")
    actions = ("revoke_selected_grants",)

    @admin.action(description="Revoke selected grants…", permissions=["decide"])
    def revoke_selected_grants(self, request: HttpRequest, queryset):
        return admin_actions.bulk_page(
            self,
            request,
            queryset.select_related("user", "release"),
            title="Revoke the selected grants",
            submit="Revoke",
            make_form=admin_actions.ReasonForm,
            run=lambda grant, data: reviews.grant_revoke(
                grant=grant, reviewer=request.user, reason=data["reason"]
            ),
            done="Revoked",
        )


@admin.register(LicenseVersion)
class LicenseVersionAdmin(admin.ModelAdmin):
    """New versions are published through license_publish; a published version never changes."""

    list_display = ("version", "name", "effective_from", "text_sha256", "created_at")
    fields = ("name", "version", "text", "effective_from", "text_sha256", "created_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ("text_sha256", "created_at")
        return self.fields

    def get_fields(self, request: HttpRequest, obj: Any = None):
        return self.fields[:4] if obj is None else self.fields

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except ServiceError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(request.path)

    def save_model(self, request: HttpRequest, obj: LicenseVersion, form, change: bool) -> None:
        published = license_publish(
            name=obj.name, version=obj.version, text=obj.text, effective_from=obj.effective_from
        )
        obj.pk = published.pk
        obj.text_sha256 = published.text_sha256
        obj.created_at = published.created_at
        obj._state.adding = False


@admin.register(LicenseAcceptance)
class LicenseAcceptanceAdmin(ReadOnlyAdmin):
    list_display = ("user", "license_version", "accepted_at", "ip_address")
    list_filter = ("license_version",)
    search_fields = ("user__email",)
    list_select_related = ("user", "license_version")


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "kind",
        "recipient",
        "sent_at",
        "failed_at",
        "attempts",
        "last_error",
    )
    list_filter = (SentFilter, "kind")
    search_fields = ("recipient", "kind")
    date_hierarchy = "created_at"
    actions = ("retry_selected",)

    @admin.action(description="Retry delivery of selected failed notifications")
    def retry_selected(self, request: HttpRequest, queryset) -> None:
        count = outbox_retry(notification_ids=queryset.values_list("pk", flat=True))
        self.message_user(request, f"{count} failed notification(s) queued again.")


@admin.register(ApiToken)
class ApiTokenAdmin(ReadOnlyAdmin):
    """Who holds API tokens. Only digests exist; an operator can revoke (delete) a token."""

    list_display = (
        "name",
        "user",
        "token_key",
        "second_factor",
        "created",
        "expiry",
        "last_used_at",
    )
    list_filter = ("second_factor",)
    search_fields = ("name", "token_key", "user__email")
    exclude = ("digest", "password_stamp")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("access.delete_apitoken")
