"""Shared fixtures. Alice and Bob are researchers; Charlie must never see their things."""

from __future__ import annotations

import os

import pytest
from django.conf import settings

from access.models import Application
from access.services.applications import application_save_draft, application_submit
from tests.factories import (
    LicenseVersionFactory,
    ReleaseFactory,
    ReviewerFactory,
    UserFactory,
    accept_license,
)


def skip_unless_required(message: str) -> None:
    """Skip with a visible reason, unless CI demands everything (PORTAL_REQUIRE_SERVICES=1)."""
    if settings.PORTAL_REQUIRE_SERVICES or os.environ.get("PORTAL_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " and PORTAL_REQUIRE_SERVICES=1 forbids skipping")
    pytest.skip(message)


def require_service(name: str, url: str) -> None:
    """Skip when a service is not configured, unless CI demands every service."""
    if not url:
        skip_unless_required(f"{name} is not configured (set {name.upper()}_URL to run this test)")


def require_tools(*tools: str) -> None:
    """Skip when a command-line tool is missing, unless CI demands every check."""
    import shutil

    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        skip_unless_required(
            f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)})"
        )


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Rate-limit counters and used TOTP codes live in the cache; no test inherits another's."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("REDIS_URL", "")
    require_service("redis", url)
    return url


@pytest.fixture
def license_v1(db):
    return LicenseVersionFactory(
        version="1", text="LLaMA research license v1. Noncommercial use only."
    )


@pytest.fixture
def releases(db):
    return {
        slug: ReleaseFactory(slug=slug, name=name, sort_order=i)
        for i, (slug, name) in enumerate(
            [
                ("llama-7b", "LLaMA 7B"),
                ("llama-13b", "LLaMA 13B"),
                ("llama-33b", "LLaMA 33B"),
                ("llama-65b", "LLaMA 65B"),
            ]
        )
    }


@pytest.fixture
def alice(db):
    return UserFactory(username="alice", email="alice@uni.example.edu")


@pytest.fixture
def bob(db):
    return UserFactory(username="bob", email="bob@lab.example.org")


@pytest.fixture
def charlie(db):
    return UserFactory(username="charlie", email="charlie@elsewhere.example.net")


@pytest.fixture
def reviewer(db):
    return ReviewerFactory(username="rita", email="rita@portal.example.org")


@pytest.fixture
def reviewer_client(client, reviewer, password):
    """A client signed in as the reviewer with password and TOTP code, as the admin requires."""
    from tests.twofactor import login_with_2fa

    return login_with_2fa(client, reviewer, password)


@pytest.fixture
def password() -> str:
    return "correct horse battery staple"


FIELDS = {
    "full_name": "Alice Researcher",
    "institutional_email": "alice@uni.example.edu",
    "affiliation": "University of Example",
    "organisation_type": "academic",
    "country": "GB",
    "role": "Postdoctoral researcher",
    "intended_use": "Evaluating factual recall of LLaMA models for a paper on calibration.",
}


@pytest.fixture
def make_submitted(license_v1, releases):
    """Create a submitted application for `user` requesting the given release slugs."""

    def make(user, slugs=("llama-7b", "llama-13b", "llama-33b"), **fields) -> Application:
        data = {
            **FIELDS,
            "full_name": user.username.title() + " Researcher",
            "institutional_email": user.email,
        }
        data.update(fields)
        draft = application_save_draft(
            applicant=user, fields=data, releases=[releases[s] for s in slugs]
        )
        acceptance = accept_license(user, license_v1)
        return application_submit(application=draft, applicant=user, license_acceptance=acceptance)

    return make
