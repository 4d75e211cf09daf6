"""Reviewers see releases, links and every download; they revoke links here."""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.db.models import Count, Sum
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils.html import format_html

from access import admin_actions
from access.admin import DecidePermissionMixin, ReadOnlyAdmin
from access.models import Grant
from weights.models import Artifact, DownloadEvent, DownloadLink, Release
from weights.services.fingerprinting import ALREADY_GRANTED, release_mark_fingerprinted
from weights.services.links import link_revoke


class ArtifactInline(admin.TabularInline):
    model = Artifact
    fields = ("variant", "path", "size", "sha256", "md5", "storage_key")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class ReleaseForm(forms.ModelForm):
    class Meta:
        model = Release
        fields = ("fingerprinted",)  # the admin's `fields` decide the rest of the form

    def clean_fingerprinted(self) -> bool:
        marking = self.cleaned_data.get("fingerprinted", False)
        if marking and self.instance.pk and not self.instance.fingerprinted:
            granted = Grant.objects.filter(release=self.instance).count()
            if granted:
                raise forms.ValidationError(
                    ALREADY_GRANTED.format(release=self.instance, n=granted)
                )
        return marking


@admin.register(Release)
class ReleaseAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "family", "parameter_count", "files", "size", "published_at")
    fields = (
        "name",
        "slug",
        "family",
        "parameter_count",
        "license",
        "description",
        "sort_order",
        "published_at",
        "revision",
        "fingerprinted",
        "request_form",
    )
    readonly_fields = ("published_at", "revision", "request_form")
    inlines = [ArtifactInline]
    form = ReleaseForm

    def get_readonly_fields(self, request: HttpRequest, obj: Release | None = None):
        if obj is not None and obj.fingerprinted:  # for good: the copies out stay traceable
            return (*self.readonly_fields, "fingerprinted")
        return self.readonly_fields

    def save_model(self, request: HttpRequest, obj: Release, form, change: bool) -> None:
        marking = form.cleaned_data.get("fingerprinted") and "fingerprinted" in form.changed_data
        obj.fingerprinted = obj.fingerprinted and not marking  # the service marks it
        super().save_model(request, obj, form, change)
        if marking:
            release_mark_fingerprinted(release=obj)
            obj.refresh_from_db()

    @admin.display(description="request form")
    def request_form(self, obj: Release) -> str:
        """Where operators edit the release's extra application questions (access admin)."""
        if obj.pk is None:
            return "Save the release first."
        url = reverse("admin:access_requestform_changelist") + f"?release__id__exact={obj.pk}"
        return format_html('<a href="{}">Questions applicants answer for this release</a>', url)

    def get_queryset(self, request: HttpRequest):
        return (
            super()
            .get_queryset(request)
            .annotate(_files=Count("artifacts"), _size=Sum("artifacts__size"))
        )

    @admin.display(ordering="_files")
    def files(self, obj: Release) -> int:
        return obj._files

    @admin.display(ordering="_size")
    def size(self, obj: Release) -> str:
        return filesizeformat(obj._size or 0)


class LinkStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [
            ("live", "Live"),
            ("revoked", "Revoked"),
            ("flagged", "Flagged (many IP addresses)"),
        ]

    def queryset(self, request, queryset):
        if self.value() == "live":
            return queryset.filter(revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "flagged":
            return queryset.filter(flagged_at__isnull=False)
        return queryset


@admin.register(DownloadLink)
class DownloadLinkAdmin(DecidePermissionMixin, ReadOnlyAdmin):
    list_display = (
        "token_hint",
        "user",
        "release",
        "created_at",
        "expires_at",
        "budget_copies",
        "revoked_at",
        "flagged_at",
    )
    list_filter = (LinkStateFilter, "grant__release")
    search_fields = ("grant__user__email", "token_hint")
    list_select_related = ("grant__user", "grant__release")
    exclude = ("token_hash",)
    actions = ("revoke_selected_links",)

    @admin.display(ordering="grant__user__email")
    def user(self, obj: DownloadLink) -> str:
        return obj.grant.user.email

    @admin.display(ordering="grant__release__slug")
    def release(self, obj: DownloadLink) -> str:
        return obj.grant.release.slug

    @admin.action(description="Revoke selected links…", permissions=["decide"])
    def revoke_selected_links(self, request: HttpRequest, queryset):
        return admin_actions.bulk_page(
            self,
            request,
            queryset.select_related("grant__user", "grant__release"),
            title="Revoke the selected download links",
            submit="Revoke",
            make_form=admin_actions.ReasonForm,
            run=lambda link, data: link_revoke(
                link=link, actor=request.user, reason=data["reason"]
            ),
            done="Revoked",
        )


@admin.register(DownloadEvent)
class DownloadEventAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "user",
        "artifact",
        "ip_address",
        "range_header",
        "bytes",
        "status_code",
        "outcome",
    )
    list_filter = ("outcome", "status_code", "created_at")
    search_fields = ("user__email", "ip_address", "artifact__path")
    list_select_related = ("user", "artifact__release")
    date_hierarchy = "created_at"
