"""Approval policies in the admin: a policy per release, its rules inline and in order,
and a dry run against what reviewers decided (access.services.approval_policies)."""

from __future__ import annotations

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from access.models import ApprovalPolicy, PolicyRule
from access.services.approval_policies import policy_dry_run

DRY_RUN_DEFAULT = 100
DRY_RUN_MAX = 5000


class PolicyRuleInline(admin.StackedInline):
    model = PolicyRule
    extra = 0
    ordering = ("position", "pk")
    fields = ("position", "name", "conditions", "outcome", "question")


@admin.register(ApprovalPolicy)
class ApprovalPolicyAdmin(admin.ModelAdmin):
    change_form_template = "admin/access/approvalpolicy/change_form.html"
    list_display = ("name", "release", "mode", "rule_count", "dry_run_link", "updated_at")
    list_filter = ("mode",)
    list_select_related = ("release",)
    search_fields = ("name", "release__slug", "release__name")
    inlines = (PolicyRuleInline,)
    actions = ("dry_run_selected",)

    @admin.display(description="rules")
    def rule_count(self, obj: ApprovalPolicy) -> int:
        return obj.rules.count()

    @admin.display(description="dry run")
    def dry_run_link(self, obj: ApprovalPolicy) -> str:
        url = reverse("admin:access_approvalpolicy_dry_run", args=[obj.pk])
        return format_html('<a href="{}">Dry run</a>', url)

    def get_urls(self):
        view = self.admin_site.admin_view(self.dry_run_view)
        return [
            path("<int:object_id>/dry-run/", view, name="access_approvalpolicy_dry_run")
        ] + super().get_urls()

    def _last(self, request: HttpRequest) -> int:
        try:
            last = int(request.GET.get("last", DRY_RUN_DEFAULT))
        except ValueError:
            return DRY_RUN_DEFAULT
        return max(1, min(last, DRY_RUN_MAX))

    def _render_dry_run(
        self, request: HttpRequest, policies: list[ApprovalPolicy], last: int
    ) -> HttpResponse:
        reports = [(policy, policy_dry_run(policy.release, last=last)) for policy in policies]
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Dry run of " + ", ".join(str(policy) for policy in policies),
            "reports": reports,
            "last": last,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/access/approvalpolicy/dry_run.html", context)

    def dry_run_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        policy = self.get_object(request, str(object_id))
        if policy is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, str(object_id))
        if not self.has_view_permission(request, policy):
            raise PermissionDenied
        return self._render_dry_run(request, [policy], self._last(request))

    @admin.action(description=f"Dry run on the last {DRY_RUN_DEFAULT} decided applications")
    def dry_run_selected(self, request: HttpRequest, queryset):
        return self._render_dry_run(
            request, list(queryset.select_related("release")), DRY_RUN_DEFAULT
        )
