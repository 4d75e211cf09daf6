"""API request and response bodies.

Request serializers check shape and type, field by field, and reject unknown
fields; the rules (who may do what, when) stay in access.services.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django_countries.serializers import CountryFieldMixin
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail

from access import errors
from access.models import (
    ApiToken,
    Application,
    ApplicationEvent,
    Grant,
    LicenseAcceptance,
    LicenseVersion,
)
from access.request_form_serializers import AnswersField, AnswersMixin
from access.selectors import REVIEW_QUEUE_ORDERINGS, screening_flags
from access.services.applications import EDITABLE_FIELDS
from access.validators import ANSWER_TEXT
from weights.models import Release

UNKNOWN_FIELD = "Unknown field. See /api/docs/ for the fields this endpoint accepts."
UNKNOWN_RELEASES = "Unknown release(s): {slugs}. Choose from: {choices}."
DUPLICATE_RELEASES = "List each release once."
MUST_ACCEPT = "Set this to true to accept the license."
LICENSE_VERSION_STALE = "Version {given} is not the current license (current: {current})."
MAX_RELEASES = 20
MAX_TEXT = 5000

Status = Application.Status


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, so a typo is a 400 rather than silently ignored."""

    def to_internal_value(self, data: Any) -> Any:
        unknown = sorted(set(data) - set(self.fields)) if isinstance(data, Mapping) else []
        unknown_errors = {
            name: [ErrorDetail(UNKNOWN_FIELD, code="unknown_field")] for name in unknown
        }
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if isinstance(exc.detail, dict):
                exc.detail.update(unknown_errors)  # report every problem at once
            raise
        if unknown_errors:
            raise serializers.ValidationError(unknown_errors)
        return value


class ReleaseSlugsField(serializers.ListField):
    """A list of catalogue slugs in, a list of Release rows out."""

    child = serializers.SlugField(max_length=64)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", MAX_RELEASES)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[Release]:
        slugs = super().to_internal_value(data)
        if len(set(slugs)) != len(slugs):
            raise serializers.ValidationError(DUPLICATE_RELEASES)
        found = {release.slug: release for release in Release.objects.filter(slug__in=slugs)}
        missing = [slug for slug in slugs if slug not in found]
        if missing:
            choices = Release.objects.values_list("slug", flat=True)
            raise serializers.ValidationError(
                UNKNOWN_RELEASES.format(slugs=", ".join(missing), choices=", ".join(choices))
            )
        return [found[slug] for slug in slugs]

    def to_representation(self, data: Any) -> list[str]:
        return [release.slug for release in data]


# --- Requests ---------------------------------------------------------------


class ApplicationWriteSerializer(CountryFieldMixin, StrictSerializer, serializers.ModelSerializer):
    """Draft fields; every one is optional because drafts may be incomplete."""

    releases = ReleaseSlugsField(
        required=False, help_text="Catalogue slugs of the releases requested, e.g. llama-7b."
    )
    answers = AnswersField()

    class Meta:
        model = Application
        fields = [*EDITABLE_FIELDS, "releases", "answers"]


class SubmitSerializer(StrictSerializer):
    accept_license = serializers.BooleanField(
        help_text="Must be true: you accept the current license version."
    )

    def validate_accept_license(self, value: bool) -> bool:
        if not value:
            raise serializers.ValidationError(errors.LICENSE_NOT_ACCEPTED)
        return value


class LicenseAcceptSerializer(StrictSerializer):
    accept = serializers.BooleanField(help_text="Must be true.")
    version = serializers.CharField(
        required=False,
        max_length=32,
        help_text="Optional: the version you read; refused if it is no longer current.",
    )

    def validate_accept(self, value: bool) -> bool:
        if not value:
            raise serializers.ValidationError(MUST_ACCEPT)
        return value

    def validate_version(self, value: str) -> str:
        current = self.context["license"]
        if value != current.version:
            raise serializers.ValidationError(
                LICENSE_VERSION_STALE.format(given=value, current=current.version)
            )
        return value


class AnswerSerializer(StrictSerializer):
    answer = serializers.CharField(max_length=MAX_TEXT, validators=[ANSWER_TEXT])


class ReasonSerializer(StrictSerializer):
    reason = serializers.CharField(max_length=MAX_TEXT, help_text="Shown to the applicant.")


class QuestionSerializer(StrictSerializer):
    question = serializers.CharField(max_length=MAX_TEXT, help_text="Shown to the applicant.")


class ApproveSerializer(StrictSerializer):
    releases = ReleaseSlugsField(
        allow_empty=False, help_text="The requested releases to grant (all or some)."
    )
    note = serializers.CharField(
        required=False, allow_blank=True, max_length=MAX_TEXT, help_text="Shown to the applicant."
    )


class QueueFilterSerializer(serializers.Serializer):
    """Query parameters; others (page, page_size) belong to the paginator."""

    status = serializers.MultipleChoiceField(
        choices=[choice for choice in Status.choices if choice[0] != Status.DRAFT],
        required=False,
        help_text="Statuses to list (repeatable); default: submitted and info_requested.",
    )
    updated_since = serializers.DateTimeField(
        required=False,
        help_text="ISO 8601 date-time, e.g. 2025-01-31T09:00:00Z: only applications changed "
        "at or after it. To poll, pass the largest `updated_at` you have seen; an "
        "application seen at that instant comes again, so keep it by `id`.",
    )
    release = serializers.SlugField(
        required=False, help_text="Only applications requesting this release (its slug)."
    )
    ordering = serializers.ChoiceField(
        choices=REVIEW_QUEUE_ORDERINGS,
        required=False,
        default=REVIEW_QUEUE_ORDERINGS[0],
        error_messages={
            "invalid_choice": f'"{{input}}" is not a valid ordering; use one of: '
            f"{', '.join(REVIEW_QUEUE_ORDERINGS)}."
        },
        help_text="Sort key; `-` for descending. Default: submitted_at (oldest first); "
        "updated_at suits polling.",
    )

    def validate_release(self, slug: str) -> Release:
        release = Release.objects.filter(slug=slug).first()
        if release is None:
            choices = ", ".join(Release.objects.values_list("slug", flat=True))
            raise serializers.ValidationError(UNKNOWN_RELEASES.format(slugs=slug, choices=choices))
        return release


class TokenCreateSerializer(StrictSerializer):
    # Blank, long or invisible names are the service's to refuse, with the page's messages.
    name = serializers.CharField(
        allow_blank=True,
        trim_whitespace=False,
        max_length=1000,
        help_text="What uses the token, e.g. the machine or script (at most 100 characters).",
    )
    days = serializers.IntegerField(
        required=False,
        help_text="Lifetime in days (default 30; at most 90, and 7 for staff).",
    )


# --- Responses --------------------------------------------------------------


class TokenSerializer(serializers.ModelSerializer):
    key = serializers.CharField(
        source="token_key", help_text="The token's first characters: its public name."
    )
    second_factor = serializers.BooleanField(
        help_text="Minted from a session that passed two-factor authentication; only such "
        "tokens act as a reviewer."
    )

    class Meta:
        model = ApiToken
        fields = ["key", "name", "created", "expiry", "last_used_at", "second_factor"]


class TokenCreatedSerializer(TokenSerializer):
    token = serializers.CharField(
        help_text="The secret, shown this once and never stored: send it as "
        "`Authorization: Bearer <token>`."
    )

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]


class ReleaseSerializer(serializers.ModelSerializer):
    class Meta:
        model = Release
        fields = ["slug", "name"]


class LicenseSerializer(serializers.ModelSerializer):
    accepted = serializers.SerializerMethodField(
        help_text="Whether you have accepted this version."
    )

    class Meta:
        model = LicenseVersion
        fields = ["name", "version", "text", "text_sha256", "effective_from", "accepted"]

    def get_accepted(self, obj: LicenseVersion) -> bool:
        user = self.context["request"].user
        return LicenseAcceptance.objects.filter(user=user, license_version=obj).exists()


class LicenseAcceptanceSerializer(serializers.ModelSerializer):
    version = serializers.CharField(source="license_version.version")

    class Meta:
        model = LicenseAcceptance
        fields = ["version", "accepted_at"]


class EventSerializer(serializers.ModelSerializer):
    action_display = serializers.CharField(source="get_action_display")
    by = serializers.SerializerMethodField(help_text="applicant or reviewer")
    # Plain string: the same choices as Application.status would need a second enum name.
    to_status = serializers.CharField(help_text="The application's status after this event.")

    class Meta:
        model = ApplicationEvent
        fields = [
            "action",
            "action_display",
            "by",
            "message",
            "releases",
            "to_status",
            "created_at",
        ]

    def get_by(self, obj: ApplicationEvent) -> str:
        if obj.actor_label:  # decided by an approval policy
            return "policy"
        return "applicant" if obj.actor_id == obj.application.applicant_id else "reviewer"


class ApplicationGrantSerializer(serializers.ModelSerializer):
    """A grant as its application shows it; /api/grants/ has the downloads (weights.api)."""

    release = ReleaseSerializer()
    license_version = serializers.CharField(source="license_version.version")
    active = serializers.BooleanField(source="is_active")

    class Meta:
        model = Grant
        fields = [
            "release",
            "license_version",
            "active",
            "created_at",
            "revoked_at",
            "revoke_reason",
        ]


class ApplicationSummarySerializer(CountryFieldMixin, serializers.ModelSerializer):
    status_display = serializers.CharField(source="get_status_display")
    releases = ReleaseSerializer(source="requested_releases", many=True)

    class Meta:
        model = Application
        fields = [
            "id",
            "status",
            "status_display",
            "releases",
            "created_at",
            "submitted_at",
            "decided_at",
        ]


APPLICANT_HIDDEN_EVENTS = ("held",)


class ApplicationSerializer(AnswersMixin, ApplicationSummarySerializer):
    """What the applicant sees: their answers, the timeline and their grants."""

    license_version = serializers.CharField(
        source="license_acceptance.license_version.version", allow_null=True, default=None
    )
    events = serializers.SerializerMethodField()
    grants = ApplicationGrantSerializer(many=True)

    class Meta(ApplicationSummarySerializer.Meta):
        fields = [
            *ApplicationSummarySerializer.Meta.fields,
            *EDITABLE_FIELDS,
            "answers",
            "license_version",
            "updated_at",
            "events",
            "grants",
        ]

    @extend_schema_field(EventSerializer(many=True))
    def get_events(self, obj: Application) -> list[dict]:
        # As on the page: a hold names the policy rule that held it, not for applicants.
        events = [e for e in obj.events.all() if e.action not in APPLICANT_HIDDEN_EVENTS]
        return EventSerializer(events, many=True, context=self.context).data


class ReviewQueueItemSerializer(ApplicationSummarySerializer):
    applicant_email = serializers.EmailField(source="applicant.email")

    class Meta(ApplicationSummarySerializer.Meta):
        fields = [
            *ApplicationSummarySerializer.Meta.fields,
            "updated_at",
            "applicant_email",
            "full_name",
            "affiliation",
            "organisation_type",
            "country",
        ]


class FlagSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class ReviewEventSerializer(EventSerializer):
    actor_email = serializers.EmailField(source="actor.email")

    class Meta(EventSerializer.Meta):
        fields = [*EventSerializer.Meta.fields, "actor_email"]


class ReviewApplicationSerializer(ApplicationSerializer):
    """Everything the applicant wrote, plus who they are and the screening flags."""

    applicant_email = serializers.EmailField(source="applicant.email")
    license_accepted_at = serializers.DateTimeField(
        source="license_acceptance.accepted_at", allow_null=True, default=None
    )
    events = ReviewEventSerializer(many=True)
    screening_flags = serializers.SerializerMethodField()

    class Meta(ApplicationSerializer.Meta):
        fields = [
            *ApplicationSerializer.Meta.fields,
            "applicant_email",
            "license_accepted_at",
            "screening_flags",
        ]

    @extend_schema_field(FlagSerializer(many=True))
    def get_screening_flags(self, obj: Application) -> list[dict[str, str]]:
        return FlagSerializer(screening_flags(obj), many=True).data


# --- Direct grants and per-release revocation (access.api_grants) --------------------------

UNKNOWN_ACCOUNT = "No account has the email address or id {value}."


class AccountField(serializers.CharField):
    """An account by its email address (any case) or its numeric id."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 254)
        kwargs.setdefault("help_text", "The account's email address or its numeric id.")
        super().__init__(**kwargs)

    def run_validation(self, data: Any = serializers.empty) -> Any:
        from django.contrib.auth import get_user_model

        value = super().run_validation(data)  # the text, its length checked
        accounts = get_user_model().objects
        found = (
            accounts.filter(pk=int(value)).first()
            if value.isdigit()
            else accounts.filter(email__iexact=value).order_by("pk").first()
        )
        if found is None:
            raise serializers.ValidationError(UNKNOWN_ACCOUNT.format(value=value))
        return found


class ReleaseSlugField(serializers.SlugField):
    """One catalogue slug in, its Release row out."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 64)
        kwargs.setdefault("help_text", "The release's catalogue slug, e.g. llama-7b.")
        super().__init__(**kwargs)

    def run_validation(self, data: Any = serializers.empty) -> Release:
        slug = super().run_validation(data)  # the slug, its form and length checked
        release = Release.objects.filter(slug=slug).first()
        if release is None:
            choices = ", ".join(Release.objects.values_list("slug", flat=True))
            raise serializers.ValidationError(UNKNOWN_RELEASES.format(slugs=slug, choices=choices))
        return release


class DirectGrantCreateSerializer(StrictSerializer):
    user = AccountField()
    release = ReleaseSlugField()
    reason = serializers.CharField(
        max_length=MAX_TEXT, help_text="Why this account gets the release; kept for the record."
    )


class GrantFilterSerializer(serializers.Serializer):
    """Query parameters; others (page, page_size) belong to the paginator."""

    user = AccountField(required=False)
    release = ReleaseSlugField(required=False)
    active = serializers.BooleanField(
        required=False,
        allow_null=True,
        default=None,
        help_text="true: only active grants; false: only revoked ones; omit for both.",
    )


class ReviewGrantSerializer(serializers.ModelSerializer):
    """A grant as a reviewer sees it: whose, from which application (null: direct), and why."""

    user_id = serializers.IntegerField()
    user_email = serializers.EmailField(source="user.email")
    release = ReleaseSerializer()
    application_id = serializers.IntegerField(
        allow_null=True, help_text="Null for a grant given directly, without an application."
    )
    direct_reason = serializers.CharField(
        allow_null=True, help_text="For a direct grant, the reviewer's reason; else null."
    )
    license_version = serializers.CharField(source="license_version.version")
    active = serializers.BooleanField(source="is_active")
    granted_by_email = serializers.EmailField(source="granted_by.email")
    revoked_by_email = serializers.EmailField(
        source="revoked_by.email", allow_null=True, default=None
    )

    class Meta:
        model = Grant
        fields = [
            "id",
            "user_id",
            "user_email",
            "release",
            "application_id",
            "direct_reason",
            "license_version",
            "active",
            "granted_by_email",
            "created_at",
            "revoked_at",
            "revoked_by_email",
            "revoke_reason",
        ]
