from __future__ import annotations

from django import forms

from access.models import Application
from access.services.applications import EDITABLE_FIELDS
from access.tokens import TOKEN_NAME
from access.validators import ANSWER_TEXT
from weights.models import Release


class ApplicationForm(forms.ModelForm):
    requested_releases = forms.ModelMultipleChoiceField(
        queryset=Release.objects.all(),
        widget=forms.CheckboxSelectMultiple,
        required=False,
        label="Releases requested",
        error_messages={"invalid_choice": "%(value)s is not a release in the catalogue."},
    )
    accept_license = forms.BooleanField(
        required=False, label="I have read and accept the license above"
    )

    class Meta:
        model = Application
        fields = [*EDITABLE_FIELDS, "requested_releases"]
        widgets = {
            "intended_use": forms.Textarea(attrs={"rows": 6}),
            "publications": forms.Textarea(attrs={"rows": 3}),
        }
        help_texts = {
            "institutional_email": "An address at your institution; reviewers use it to confirm affiliation.",
            "orcid": "Optional, e.g. 0000-0002-1825-0097.",
            "intended_use": "What you will study with the weights, and how you will share results.",
        }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from django.conf import settings

        self.fields["intended_use"].widget.attrs["maxlength"] = (
            settings.PORTAL_INTENDED_USE_MAX_LENGTH
        )

    def service_fields(self) -> dict:
        return {name: self.cleaned_data.get(name, "") for name in EDITABLE_FIELDS}


class AnswerForm(forms.Form):
    answer = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5}),
        max_length=5000,
        strip=True,
        validators=[ANSWER_TEXT],
    )


class LicenseAcceptForm(forms.Form):
    accept = forms.BooleanField(required=True, label="I have read and accept this license")


LIFETIME_CHOICES = (1, 7, 30, 90)


class ApiTokenForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        help_text="What will use it, e.g. “lab cluster” or “CI script”.",
        validators=[TOKEN_NAME],
    )
    days = forms.TypedChoiceField(coerce=int, label="Expires after")

    def __init__(self, *args, max_days: int, default_days: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        choices = [d for d in LIFETIME_CHOICES if d <= max_days] or [max_days]
        self.fields["days"].choices = [(d, f"{d} day{'s' if d > 1 else ''}") for d in choices]
        self.fields["days"].initial = min(default_days, max(choices))
