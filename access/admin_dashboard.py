"""The reviewer dashboard in the admin: /admin/access/reviewdashboard/, listed on the
admin index for reviewers. Figures from access.review_dashboard; no model rows shown."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path

from access.admin_base import ReadOnlyAdmin
from access.models import ReviewDashboard
from access.review_dashboard import (
    WINDOW_DAYS,
    dashboard_figures,
    decisions_chart,
    duration_text,
)
from access.services.reviews import is_reviewer

TEMPLATE = "admin/access/review_dashboard.html"


@admin.register(ReviewDashboard)
class ReviewDashboardAdmin(ReadOnlyAdmin):
    def has_module_permission(self, request: HttpRequest) -> bool:
        return is_reviewer(request.user)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return is_reviewer(request.user)

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        view = self.admin_site.admin_view(self.changelist_view)
        return [path("", view, name="{}_{}_changelist".format(*info))]

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        figures = dashboard_figures()
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Review dashboard",
            "figures": figures,
            "chart": decisions_chart(figures.days),
            "window_days": WINDOW_DAYS,
            "median_text": duration_text(figures.median_to_decision),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, TEMPLATE, context)
