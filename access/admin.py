"""The reviewer's admin: a queue of applications, decided case by case.

Reviewers never edit what an applicant wrote; they decide through the services in
access.services.reviews, from the change page or as actions on selected rows.
Decisions need the access.decide_application permission.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IS_POPUP_VAR
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django_countries import countries

import access.admin_request_forms  # noqa: F401 (registers RequestFormAdmin)
from access import (  # noqa: F401 (registers)
    admin_actions,
    admin_dashboard,
    admin_grants,
    admin_policies,
)
from access.admin_base import ReadOnlyAdmin  # noqa: F401 (weights.admin imports it from here)
from access.errors import InvalidInput, ServiceError
from access.models import (
    ApiToken,
    Application,
    ApplicationEvent,
    Grant,
    LicenseAcceptance,
    LicenseVersion,
    Notification,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEventType,
)
from access.review_queue_admin import DECISION_KEYS, QueueAdminMixin
from access.selectors import review_queue, screening_flags
from access.services import reviews, webhooks
from access.services.licenses import license_publish
from access.services.notifications import outbox_retry
from access.services.request_forms import answer_sheets

Status = Application.Status


class DecidePermissionMixin:
    def has_decide_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("access.decide_application")


class CountryListFilter(admin.SimpleListFilter):
    """Only the countries that occur in the queue, by name, not all 250."""

    title = "country"
    parameter_name = "country"

    def lookups(self, request, model_admin):
        # DISTINCT in the database (application_country_idx), not 100,000 rows into Python.
        codes = (
            model_admin.get_queryset(request)
            .order_by()
            .values_list("country", flat=True)
            .distinct()
        )
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
class ApplicationAdmin(QueueAdminMixin, DecidePermissionMixin, ReadOnlyAdmin):
    change_form_template = "admin/access/application/change_form.html"
    list_display = (
        "id",
        "full_name",
        "applicant_email",
        "affiliation",
        "organisation_type",
        "country_name",
        "requested",
        "status",
        "age",
        "held_by",
        "flags",
    )
    list_display_links = ("id", "full_name")
    list_filter = (
        "status",
        QueueAdminMixin.ClaimFilter,
        "organisation_type",
        CountryListFilter,
        "requested_releases",
    )
    search_fields = ("full_name", "applicant__email", "institutional_email", "affiliation")
    ordering = ("submitted_at", "pk")
    list_per_page = 50
    # COUNT(*) over the whole queue on every page is not worth its time at 100,000 rows.
    show_full_result_count = False
    actions = (
        "approve_selected",
        "reject_selected",
        "request_info_selected",
        "revoke_selected",
        "claim_selected",
        "release_selected",
    )
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
                    "country_name",
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
        return review_queue().select_related(
            "claimed_by", "license_acceptance__user", "license_acceptance__license_version"
        )

    @admin.display(description="applicant email", ordering="applicant__email")
    def applicant_email(self, obj: Application) -> str:
        return obj.applicant.email

    @admin.display(description="requested releases")
    def requested(self, obj: Application) -> str:
        return ", ".join(release.name for release in obj.requested_releases.all())

    @admin.display(description="screening flags")
    def flags(self, obj: Application) -> str:
        found = self.flags_of(obj)
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
                **self.claim_context(request, obj),
                screening_flags=screening_flags(obj),
                events=obj.events.select_related("actor"),
                grants=obj.grants.select_related(
                    "release", "license_version", "granted_by", "revoked_by"
                ),
                decision_links=self.decision_links(request, obj),
                answer_sheets=answer_sheets(obj),
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    def decision_links(self, request: HttpRequest, obj: Application) -> list[tuple[str, str, str]]:
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
                DECISION_KEYS.get(name, ""),
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
        return decisions + self.claim_urls() + super().get_urls()

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
                self.run_unless_held(spec.run, application, request.user, form.cleaned_data)
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
            run=lambda obj, data: self.run_unless_held(spec.run, obj, request.user, data),
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
    readonly_fields = ("fingerprint",)
    change_list_template = "admin/access/grant/change_list.html"
    change_form_template = "admin/access/grant/change_form.html"

    def get_urls(self):
        return [
            path(
                "grant-directly/",
                self.admin_site.admin_view(self.grant_directly_view),
                name="access_grant_direct",
            ),
            path(
                "<int:object_id>/revoke/",
                self.admin_site.admin_view(self.revoke_view),
                name="access_grant_revoke",
            ),
            *super().get_urls(),
        ]

    def grant_directly_view(self, request: HttpRequest) -> HttpResponse:
        return admin_grants.grant_directly_view(self, request)

    @admin.display(description="fingerprint")
    def fingerprint(self, obj: Grant) -> str:
        from weights.services.fingerprinting import copies_state

        return copies_state(obj)

    def revoke_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        return admin_grants.grant_revoke_view(self, request, object_id)

    @admin.action(description="Revoke selected grants…", permissions=["decide"])
    def revoke_selected_grants(self, request: HttpRequest, queryset):
        return admin_grants.revoke_selected_page(self, request, queryset)


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


# --- Webhooks (access.services.webhooks, docs/webhooks.md) --------------------------------


class WebhookEndpointForm(forms.ModelForm):
    event_types = forms.MultipleChoiceField(
        choices=WebhookEventType.choices,
        widget=forms.CheckboxSelectMultiple,
        help_text="Events POSTed to this URL. The test event (ping) is sent only on request.",
    )

    class Meta:
        model = WebhookEndpoint
        fields = ("url", "description", "event_types", "is_active")


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    form = WebhookEndpointForm
    list_display = ("__str__", "url", "is_active", "subscribed", "deliveries_link", "created_at")
    list_display_links = ("__str__",)
    list_filter = ("is_active",)
    search_fields = ("url", "description")
    actions = ("send_test_event", "rotate_secret")
    readonly_fields = ("secret", "secret_grace", "recent_deliveries", "created_at", "updated_at")
    RECENT = 10

    def get_fieldsets(self, request: HttpRequest, obj: Any = None):
        endpoint = (None, {"fields": ("url", "description", "event_types", "is_active")})
        if obj is None:  # the secret is generated when the endpoint is saved
            return (endpoint,)
        return (
            endpoint,
            ("Signing", {"fields": ("secret", "secret_grace")}),
            ("Delivery log", {"fields": ("recent_deliveries",)}),
            ("Dates", {"fields": ("created_at", "updated_at")}),
        )

    def response_add(self, request: HttpRequest, obj: WebhookEndpoint, post_url_continue=None):
        if "_addanother" in request.POST or IS_POPUP_VAR in request.POST:
            return super().response_add(request, obj, post_url_continue)
        # The secret exists only from now on: show it rather than the list.
        self.message_user(
            request, "Copy the signing secret below into your receiver.", messages.INFO
        )
        return HttpResponseRedirect(reverse("admin:access_webhookendpoint_change", args=[obj.pk]))

    @admin.display(description="events")
    def subscribed(self, obj: WebhookEndpoint) -> str:
        return ", ".join(obj.event_types) or "—"

    @admin.display(description="deliveries")
    def deliveries_link(self, obj: WebhookEndpoint) -> str:
        url = reverse("admin:access_webhookdelivery_changelist")
        return format_html('<a href="{}?endpoint__id__exact={}">Delivery log</a>', url, obj.pk)

    @admin.display(description="previous secret")
    def secret_grace(self, obj: WebhookEndpoint) -> str:
        if not obj.previous_secret_at(timezone.now()):
            return "—"
        return (
            f"The secret it replaced still signs requests (a second v1) until "
            f"{obj.previous_secret_expires_at:%Y-%m-%d %H:%M} UTC."
        )

    @admin.display(description=f"last {RECENT} deliveries")
    def recent_deliveries(self, obj: WebhookEndpoint) -> str:
        rows = obj.deliveries.order_by("-created_at", "-pk")[: self.RECENT]
        body = format_html_join(
            "",
            '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>',
            (
                (
                    reverse("admin:access_webhookdelivery_change", args=[row.pk]),
                    f"{row.created_at:%Y-%m-%d %H:%M:%S}",
                    row.event_type,
                    row.get_status_display(),
                    row.attempts,
                    row.last_response_status or row.last_error or "—",
                )
                for row in rows
            ),
        )
        if not body:
            return "No deliveries yet."
        return format_html(
            "<table><thead><tr><th>Created</th><th>Event</th><th>Status</th><th>Attempts</th>"
            "<th>Last answer</th></tr></thead><tbody>{}</tbody></table>"
            '<p><a href="{}?endpoint__id__exact={}">All deliveries of this endpoint</a></p>',
            body,
            reverse("admin:access_webhookdelivery_changelist"),
            obj.pk,
        )

    @admin.action(
        description="Send a test event (ping) to selected endpoints", permissions=["change"]
    )
    def send_test_event(self, request: HttpRequest, queryset) -> None:
        inactive = [endpoint for endpoint in queryset if not endpoint.is_active]
        active = [endpoint for endpoint in queryset if endpoint.is_active]
        for endpoint in active:
            webhooks.ping_send(endpoint=endpoint)
        if active:
            self.message_user(
                request,
                f"Test event queued for {len(active)} endpoint(s); see the delivery log.",
                messages.SUCCESS,
            )
        if inactive:
            self.message_user(
                request,
                f"Not sent to {len(inactive)} inactive endpoint(s): "
                + ", ".join(str(endpoint) for endpoint in inactive),
                messages.WARNING,
            )

    @admin.action(
        description="Rotate the signing secret of selected endpoints", permissions=["change"]
    )
    def rotate_secret(self, request: HttpRequest, queryset) -> None:
        rotated = [webhooks.endpoint_rotate_secret(endpoint=endpoint) for endpoint in queryset]
        self.message_user(
            request,
            f"New secret for {len(rotated)} endpoint(s); the previous one also signs requests "
            f"for {webhooks.SECRET_GRACE.total_seconds() / 3600:.0f} hours.",
            messages.SUCCESS,
        )


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    fields = ("number", "started_at", "duration_ms", "response_status", "response_body", "error")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "event_type",
        "endpoint",
        "status",
        "attempts",
        "last_response_status",
        "short_error",
        "next_attempt_at",
        "delivered_at",
    )
    list_filter = ("status", "event_type", "endpoint")
    search_fields = ("uuid",)
    list_select_related = ("endpoint",)
    date_hierarchy = "created_at"
    fields = (
        "uuid",
        "endpoint",
        "event_type",
        "status",
        "attempts",
        "created_at",
        "next_attempt_at",
        "delivered_at",
        "failed_at",
        "last_response_status",
        "last_error",
        "payload",
    )
    readonly_fields = fields
    inlines = (WebhookAttemptInline,)
    actions = ("retry_selected",)

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("access.change_webhookendpoint")

    @admin.display(description="last error")
    def short_error(self, obj: WebhookDelivery) -> str:
        return obj.last_error if len(obj.last_error) <= 80 else obj.last_error[:79] + "…"

    @admin.display(description="payload (the body, as sent)")
    def payload(self, obj: WebhookDelivery) -> str:
        pretty = json.dumps(json.loads(webhooks.delivery_body(obj)), indent=2)
        return format_html("<pre>{}</pre>", pretty)

    @admin.action(description="Retry selected (send once more now)", permissions=["retry"])
    def retry_selected(self, request: HttpRequest, queryset) -> None:
        count = webhooks.deliveries_retry(delivery_ids=queryset.values_list("pk", flat=True))
        self.message_user(request, f"{count} delivery(ies) queued again.", messages.SUCCESS)
        left = queryset.count() - count
        if left:
            self.message_user(
                request, f"{left} delivered one(s) left alone: they are never sent twice."
            )
