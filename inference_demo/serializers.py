"""The generate request body, parsed the same way for the page (form) and the API (JSON).

Field bounds mirror settings.DEMO_LIMITS so that each bad field gets its own message;
the service checks the same caps again and has the last word.
"""

from __future__ import annotations

from django.conf import settings
from rest_framework import serializers

from inference_demo.services import DemoParams

MAX_SEED = 2**32 - 1


def default_params() -> DemoParams:
    """The dataclass defaults, with max_new_tokens within the configured cap."""
    cap = settings.DEMO_LIMITS["max_new_tokens"]
    return DemoParams(max_new_tokens=min(DemoParams.max_new_tokens, cap))


class DemoGenerateSerializer(serializers.Serializer):
    def get_fields(self) -> dict[str, serializers.Field]:
        caps = settings.DEMO_LIMITS  # read per request: operators and tests change them
        defaults = default_params()
        return {
            # Length and emptiness are the service's to judge, with its own messages.
            "prompt": serializers.CharField(allow_blank=True, trim_whitespace=False),
            "max_new_tokens": serializers.IntegerField(
                required=False,
                default=defaults.max_new_tokens,
                min_value=1,
                max_value=caps["max_new_tokens"],
            ),
            "temperature": serializers.FloatField(
                required=False,
                default=defaults.temperature,
                min_value=0,
                max_value=caps["max_temperature"],
            ),
            "top_p": serializers.FloatField(required=False, default=defaults.top_p, max_value=1),
            "seed": serializers.IntegerField(
                required=False, default=defaults.seed, min_value=0, max_value=MAX_SEED
            ),
        }

    def validate_top_p(self, value: float) -> float:
        if value <= 0:
            raise serializers.ValidationError("Ensure this value is greater than 0.")
        return value

    def params(self) -> DemoParams:
        data = self.validated_data
        return DemoParams(
            max_new_tokens=data["max_new_tokens"],
            temperature=data["temperature"],
            top_p=data["top_p"],
            seed=data["seed"],
        )


class DemoCancelSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    cancelled = serializers.BooleanField()
