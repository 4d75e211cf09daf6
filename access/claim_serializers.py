"""Claims and the queue's rows as the review API shows them (access.claim_api)."""

from __future__ import annotations

from datetime import datetime

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from access import serializers as s
from access.models import Application
from access.services import claims


class ClaimRequestSerializer(serializers.Serializer):
    takeover = serializers.BooleanField(
        default=False,
        help_text="Take the application from another reviewer whose claim is still live.",
    )


class ClaimSerializer(serializers.Serializer):
    application_id = serializers.IntegerField()
    claimed_by = serializers.EmailField(allow_null=True)
    claimed_at = serializers.DateTimeField(allow_null=True)
    expires_at = serializers.DateTimeField(allow_null=True)


def claim_data(application: Application, state: claims.ClaimState) -> dict:
    return {
        "application_id": application.pk,
        "claimed_by": state.holder_email or None,
        "claimed_at": state.since,
        "expires_at": state.since + claims.claim_timeout() if state.since else None,
    }


class ReviewQueueRowSerializer(s.ReviewQueueItemSerializer):
    claimed_by = serializers.SerializerMethodField()
    claimed_at = serializers.SerializerMethodField()
    age_seconds = serializers.SerializerMethodField(
        help_text="Seconds since the application was submitted."
    )

    class Meta(s.ReviewQueueItemSerializer.Meta):
        fields = [
            *s.ReviewQueueItemSerializer.Meta.fields,
            "claimed_by",
            "claimed_at",
            "age_seconds",
        ]

    @extend_schema_field(serializers.EmailField(allow_null=True))
    def get_claimed_by(self, obj: Application) -> str | None:
        return claims.claim_of(obj).holder_email or None

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_claimed_at(self, obj: Application) -> datetime | None:
        return claims.claim_of(obj).since

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_age_seconds(self, obj: Application) -> int | None:
        if obj.submitted_at is None:
            return None
        return int((timezone.now() - obj.submitted_at).total_seconds())
