"""API bodies of the catalogue, the grants and their download links."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from access.models import LicenseVersion
from access.request_form_serializers import RequestFormSerializer
from access.serializers import ReleaseSerializer
from access.services.request_forms import current_form
from weights.models import Artifact, Release


class LicenseBriefSerializer(serializers.ModelSerializer):
    title = serializers.CharField(source="name")

    class Meta:
        model = LicenseVersion
        fields = ["title", "version"]


class ArtifactSerializer(serializers.ModelSerializer):
    class Meta:
        model = Artifact
        fields = ["path", "variant", "size", "sha256"]


class ReleaseListSerializer(serializers.ModelSerializer):
    license = LicenseBriefSerializer(
        allow_null=True, help_text="The license the release is distributed under."
    )
    total_size = serializers.IntegerField(
        help_text="Bytes of the files a download link serves (Meta's original layout)."
    )
    file_count = serializers.IntegerField(help_text="Files a download link serves.")

    class Meta:
        model = Release
        fields = [
            "slug",
            "name",
            "family",
            "parameter_count",
            "license",
            "total_size",
            "file_count",
            "published_at",
        ]

    def to_representation(self, instance: Release) -> dict:
        data = super().to_representation(instance)
        data["total_size"] = data["total_size"] or 0  # Sum() of no files is NULL
        return data


class ReleaseDetailSerializer(ReleaseListSerializer):
    files = ArtifactSerializer(
        source="artifacts",
        many=True,
        help_text="Every file, each variant's: `original` (Meta's layout, what a download "
        "link serves) and `transformers` (the Hugging Face layout, served by the Hub door).",
    )

    request_form = serializers.SerializerMethodField(
        help_text="The extra questions an application for this release answers (the "
        "current version of its request form); null when it asks none. Send the answers "
        "as `answers` in `applications_create` or `application_update`."
    )

    class Meta(ReleaseListSerializer.Meta):
        fields = [*ReleaseListSerializer.Meta.fields, "description", "files", "request_form"]

    @extend_schema_field(RequestFormSerializer(allow_null=True))
    def get_request_form(self, release: Release) -> dict | None:
        form = current_form(release)
        return RequestFormSerializer(form).data if form is not None else None


# --- grants --------------------------------------------------------------------------------


class LinkFileSerializer(serializers.Serializer):
    path = serializers.CharField()
    variant = serializers.ChoiceField(choices=Artifact.Variant.choices)
    remaining_bytes = serializers.IntegerField(
        help_text="What this link may still fetch of the file (0 once it no longer works)."
    )


class LinkStateSerializer(serializers.Serializer):
    hint = serializers.CharField(
        source="link.token_hint", help_text="The token's first characters, to tell links apart."
    )
    state = serializers.ChoiceField(
        choices=["live", "expired", "revoked"],
        help_text="live: works now; expired: past expires_at; revoked: replaced by a fresh "
        "link, closed after expiry, or revoked with the grant (see revoke_reason).",
    )
    created_at = serializers.DateTimeField(source="link.created_at")
    expires_at = serializers.DateTimeField(source="link.expires_at")
    budget_copies = serializers.IntegerField(
        source="link.budget_copies", help_text="Full copies of each file the link may fetch."
    )
    emailed_at = serializers.DateTimeField(
        source="link.emailed_at", allow_null=True, help_text="When it was emailed, if it was."
    )
    revoked_at = serializers.DateTimeField(source="link.revoked_at", allow_null=True)
    revoke_reason = serializers.CharField(source="link.revoke_reason")
    files = LinkFileSerializer(many=True)


class GrantSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="grant.pk")
    release = ReleaseSerializer(source="grant.release")
    license_version = serializers.CharField(
        source="grant.license_version.version", help_text="The license version granted under."
    )
    active = serializers.BooleanField(source="grant.is_active")
    created_at = serializers.DateTimeField(source="grant.created_at")
    revoked_at = serializers.DateTimeField(source="grant.revoked_at", allow_null=True)
    revoke_reason = serializers.CharField(source="grant.revoke_reason")
    files = ArtifactSerializer(many=True, help_text="The release's files, every variant.")
    link = LinkStateSerializer(
        allow_null=True,
        help_text="The latest download link (null before the first one is issued). Its "
        "token is never shown again: issue a fresh link to get a working URL.",
    )


# --- a fresh link ----------------------------------------------------------------------


@extend_schema_field(OpenApiTypes.DATETIME)
class IsoDateTime(serializers.CharField):
    """A date-time already written as ISO 8601, passed on exactly as written."""


class ManifestFileSerializer(serializers.Serializer):
    path = serializers.CharField(help_text="Relative path; append it to the link URL.")
    size = serializers.IntegerField(help_text="Bytes.")
    sha256 = serializers.CharField()
    md5 = serializers.CharField()
    url = serializers.URLField(help_text="The file's download URL (holds the token).")
    remaining_bytes = serializers.IntegerField(help_text="What the link may still fetch.")


class ManifestSerializer(serializers.Serializer):
    """What GET /d/<token>/manifest.json answers (weights.manifests)."""

    release = serializers.SlugField(help_text="The release's slug.")
    name = serializers.CharField()
    expires_at = IsoDateTime()
    budget_copies = serializers.IntegerField()
    files = ManifestFileSerializer(many=True)


class IssuedLinkSerializer(serializers.Serializer):
    url = serializers.URLField(
        help_text="The link: its landing page, and the base of every file URL (url + path). "
        "Shown this once; the previous link of the grant no longer works."
    )
    manifest_url = serializers.URLField(help_text="GET: the manifest below, as JSON.")
    download_script_url = serializers.URLField(
        help_text="GET: a POSIX shell script that fetches and checks every file."
    )
    llama_stack_url = serializers.URLField(
        help_text="GET: the files for Meta's CLI: "
        "`llama download --source meta --manifest-file llama-stack.json`."
    )
    cli_command = serializers.CharField(help_text="The portal's resuming download client.")
    hint = serializers.CharField(help_text="The token's first characters.")
    expires_at = serializers.DateTimeField()
    budget_copies = serializers.IntegerField(help_text="Full copies of each file it may fetch.")
    manifest = ManifestSerializer(help_text="What manifest_url answers now.")
