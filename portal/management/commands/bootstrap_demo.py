"""Load the embedded demo data: license v1, the LLaMA catalogue and three accounts.

Safe to run again: existing rows are kept, and the accounts' passwords are kept in
var/demo-credentials.json so that they stay the same between runs.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from allauth.account.models import EmailAddress
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from access.models import LicenseVersion
from access.services.licenses import license_publish
from access.services.reviewers import reviewers_group_ensure
from weights.models import Release
from weights.services.publishing import release_publish

CATALOGUE = [
    ("llama-7b", "LLaMA 7B"),
    ("llama-13b", "LLaMA 13B"),
    ("llama-33b", "LLaMA 33B"),
    ("llama-65b", "LLaMA 65B"),
]
LICENSE_TEXT = Path(__file__).resolve().parents[2] / "fixtures" / "license_v1.txt"
DEMO_MODEL_DIR = Path(settings.BASE_DIR) / "inference_demo" / "demo_model"
DEMO_RELEASE = {
    "slug": "llama-demo",
    "name": "LLaMA demo (bundled, 3.9M)",
    "parameter_count": 3_900_000,
    "description": "A tiny LLaMA trained on the Python documentation, in Meta's release layout.",
}
ACCOUNTS = [
    ("admin", "admin@example.org", "superuser"),
    ("reviewer", "reviewer@example.org", "reviewer"),
    ("researcher", "researcher@uni.example.edu", "researcher"),
]


class Command(BaseCommand):
    help = "Create the demo license, catalogue and accounts (idempotent)."

    def handle(self, *args, **options) -> None:
        with transaction.atomic():
            if not LicenseVersion.objects.filter(version="1").exists():
                license_publish(
                    name="LLaMA Noncommercial Research License",
                    version="1",
                    text=LICENSE_TEXT.read_text(),
                )
            for order, (slug, name) in enumerate(CATALOGUE):
                Release.objects.get_or_create(
                    slug=slug, defaults={"name": name, "sort_order": order}
                )
            group = reviewers_group_ensure()
            passwords = self._passwords()
            for username, email, role in ACCOUNTS:
                self._account(username, email, role, passwords[username], group)
        # The bundled model travels the same road as a real release; rerunning publishes nothing.
        demo = release_publish(directory=DEMO_MODEL_DIR, **DEMO_RELEASE)
        if demo.created:
            self.stdout.write(f"Published {demo.release.slug}: {len(demo.created)} files.")
        variant = demo.transformers.published if demo.transformers else None
        if variant is not None and variant.created:
            self.stdout.write(demo.transformers.message)
        Release.objects.filter(license__isnull=True).update(
            license=LicenseVersion.objects.get(version="1")
        )
        Release.objects.filter(slug=DEMO_RELEASE["slug"], sort_order=0).update(
            sort_order=len(CATALOGUE)
        )
        self.stdout.write(
            self.style.SUCCESS(
                "Demo data ready. Sign in at http://127.0.0.1:8000/accounts/login/ with:"
            )
        )
        for username, email, role in ACCOUNTS:
            self.stdout.write(f"  {role:<10} {email:<28} password: {passwords[username]}")
        if not settings.PORTAL_ADMIN_REQUIRE_2FA:
            self.stdout.write("  (embedded development mode: the admin opens without 2FA)")

    def _passwords(self) -> dict[str, str]:
        path = settings.VAR_DIR / "demo-credentials.json"
        if path.exists():
            return json.loads(path.read_text())
        passwords = {username: secrets.token_urlsafe(9) for username, _, _ in ACCOUNTS}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(passwords, indent=2))
        path.chmod(0o600)
        return passwords

    def _account(self, username: str, email: str, role: str, password: str, group) -> None:
        user_model = get_user_model()
        user, created = user_model.objects.get_or_create(
            username=username, defaults={"email": email}
        )
        if created:
            user.set_password(password)
        user.email = email
        user.is_staff = role in ("superuser", "reviewer")
        user.is_superuser = role == "superuser"
        user.save()
        if role in ("superuser", "reviewer"):
            user.groups.add(group)
        EmailAddress.objects.update_or_create(
            user=user, email=email, defaults={"verified": True, "primary": True}
        )
