from __future__ import annotations

from django import forms

from access.models import Application
from access.services.applications import EDITABLE_FIELDS
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
    answer = forms.CharField(widget=forms.Textarea(attrs={"rows": 5}), max_length=5000, strip=True)


class LicenseAcceptForm(forms.Form):
    accept = forms.BooleanField(required=True, label="I have read and accept this license")
