from __future__ import annotations

import io
import json

import pytest
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.core.management import call_command

from access.models import LicenseVersion
from weights.models import Release

pytestmark = pytest.mark.django_db


def test_bootstrap_demo_is_idempotent_and_prints_credentials(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "weights"
    first, second = io.StringIO(), io.StringIO()
    call_command("bootstrap_demo", stdout=first)
    call_command("bootstrap_demo", stdout=second)

    assert LicenseVersion.objects.count() == 1
    assert list(Release.objects.values_list("slug", flat=True)) == [
        "llama-7b",
        "llama-13b",
        "llama-33b",
        "llama-65b",
        "llama-demo",
    ]
    demo = Release.objects.get(slug="llama-demo")
    assert demo.is_published() and demo.license.version == "1"
    paths = set(demo.artifacts.values_list("path", flat=True))
    assert {"params.json", "consolidated.00.pth", "consolidated.01.pth", "tokenizer.model"} <= paths
    for artifact in demo.artifacts.all():
        assert (tmp_path / "weights" / artifact.storage_key).stat().st_size == artifact.size
    users = get_user_model().objects
    assert users.count() == 3
    reviewer = users.get(username="reviewer")
    assert reviewer.is_staff and not reviewer.is_superuser
    assert reviewer.has_perm("access.decide_application") and not reviewer.has_perm(
        "access.change_application"
    )
    assert not users.get(username="researcher").is_staff
    assert EmailAddress.objects.filter(verified=True).count() == 3

    passwords = json.loads((tmp_path / "demo-credentials.json").read_text())
    assert "Published llama-demo: 7 files." in first.getvalue()
    assert "Published" not in second.getvalue()
    assert first.getvalue().endswith(second.getvalue())
    for username, password in passwords.items():
        assert password in first.getvalue()
        assert users.get(username=username).check_password(password)
