"""Demo requests for abuse review: read-only; the periodic purge deletes old ones."""

from __future__ import annotations

import json
from datetime import timedelta

from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from inference_demo.models import DemoRequest

RETENTION_NOTE = "Kept for abuse review; requests older than {days} days are purged daily."


@admin.register(DemoRequest)
class DemoRequestAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "user",
        "release",
        "client",
        "status",
        "tokens_in",
        "tokens_out",
        "ttft_ms",
        "duration_ms",
    )
    list_filter = ("status", "release", "client", "created_at")
    search_fields = ("user__email", "prompt")
    date_hierarchy = "created_at"
    list_select_related = ("user", "release")
    ordering = ("-created_at",)
    fieldsets = (
        (None, {"fields": ("user", "release", "client", "status", "created_at")}),
        ("Request", {"fields": ("prompt_text", "params_text")}),
        (
            "Outcome",
            {
                "fields": (
                    "finish_reason",
                    "tokens_in",
                    "tokens_out",
                    "ttft_ms",
                    "duration_ms",
                    "started_at",
                    "cancel_requested_at",
                    "finished_at",
                    "error",
                    "retention",
                )
            },
        ),
    )

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        days = settings.DEMO_RETENTION_DAYS
        extra_context = {**(extra_context or {}), "subtitle": RETENTION_NOTE.format(days=days)}
        return super().changelist_view(request, extra_context)

    def get_readonly_fields(self, request: HttpRequest, obj: DemoRequest | None = None):
        return [f for fields in (fs["fields"] for _, fs in self.fieldsets) for f in fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: DemoRequest | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: DemoRequest | None = None) -> bool:
        return False  # records leave only through the retention purge

    @admin.display(description="Prompt")
    def prompt_text(self, obj: DemoRequest) -> str:
        return format_html('<pre style="white-space:pre-wrap">{}</pre>', obj.prompt)

    @admin.display(description="Parameters")
    def params_text(self, obj: DemoRequest) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.params, indent=2, sort_keys=True))

    @admin.display(description="Kept until")
    def retention(self, obj: DemoRequest) -> str:
        kept_until = obj.created_at + timedelta(days=settings.DEMO_RETENTION_DAYS)
        return (
            f"{kept_until:%Y-%m-%d %H:%M} UTC "
            f"(purged {settings.DEMO_RETENTION_DAYS} days after the request)"
        )
