from __future__ import annotations

import factory
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.utils import timezone

from access.models import Application, LicenseAcceptance, LicenseVersion
from access.services.reviewers import reviewers_group_ensure
from weights.models import Release


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@uni.example.edu")
    password = factory.django.Password("correct horse battery staple")

    @factory.post_generation
    def verified(self, create, extracted, **kwargs):
        if create and extracted is not False:
            EmailAddress.objects.get_or_create(
                user=self, email=self.email, defaults={"verified": True, "primary": True}
            )


class ReviewerFactory(UserFactory):
    is_staff = True

    @factory.post_generation
    def reviewers_group(self, create, extracted, **kwargs):
        if create:
            self.groups.add(reviewers_group_ensure())


class ReleaseFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Release
        django_get_or_create = ("slug",)

    slug = factory.Sequence(lambda n: f"llama-{n}b")
    name = factory.LazyAttribute(
        lambda r: r.slug.replace("llama-", "LLaMA ").upper().replace("LLAMA", "LLaMA")
    )


class LicenseVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = LicenseVersion
        django_get_or_create = ("version",)

    name = "LLaMA Noncommercial Research License"
    version = factory.Sequence(lambda n: f"{n + 1}")
    text = factory.LazyAttribute(
        lambda lv: f"License text version {lv.version}. Research use only."
    )
    text_sha256 = factory.LazyAttribute(lambda lv: LicenseVersion.digest(lv.text))
    effective_from = factory.LazyFunction(lambda: timezone.now() - timezone.timedelta(days=1))


class ApplicationFactory(factory.django.DjangoModelFactory):
    """A complete draft; use `submitted_application` in conftest for a submitted one."""

    class Meta:
        model = Application

    applicant = factory.SubFactory(UserFactory)
    full_name = factory.Faker("name")
    institutional_email = factory.LazyAttribute(lambda a: a.applicant.email)
    affiliation = "University of Example"
    organisation_type = "academic"
    country = "GB"
    role = "PhD student"
    intended_use = "Studying calibration of large language models on reasoning benchmarks."


def accept_license(user, license_version) -> LicenseAcceptance:
    return LicenseAcceptance.objects.create(
        user=user, license_version=license_version, ip_address="127.0.0.1"
    )
