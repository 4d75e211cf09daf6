"""Settings come from the environment and fail loudly on bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": "x" * 30 + "-production-secret-key-for-the-test-only-0123456789",
    "ALLOWED_HOSTS": "llama.example.org",
    "PORTAL_SITE_URL": "https://llama.example.org",
}


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "PORTAL_", "DATABASE_", "REDIS_"))
    }
    clean.update(
        {"DJANGO_SETTINGS_MODULE": "portal.settings", "PORTAL_VAR_DIR": "/tmp/portal-settings-test"}
    )
    clean.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_configuration_passes_check_deploy():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DEBUG": "maybe"}, "DEBUG must be one of"),
        ({**PRODUCTION, "SECRET_KEY": "short"}, "SECRET_KEY must be set"),
        ({"DEBUG": "0"}, "SECRET_KEY must be set"),
        ({"DATABASE_URL": "nosuchdb://x"}, "DATABASE_URL is not a valid database URL"),
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL must start with"),
        ({"EMAIL_PORT": "twenty-five"}, "EMAIL_PORT must be an integer"),
        (
            {"PORTAL_REVIEWER_NOTIFICATIONS": "hourly"},
            "PORTAL_REVIEWER_NOTIFICATIONS must be one of",
        ),
        (
            {**PRODUCTION, "PORTAL_ADMIN_REQUIRE_2FA": "0"},
            "PORTAL_ADMIN_REQUIRE_2FA may only be turned off",
        ),
    ],
)
def test_bad_values_fail_with_improperly_configured(env, message):
    result = manage("check", env=env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and message in result.stderr


def test_embedded_defaults_need_no_service():
    result = manage("shell", "-c", _PRINT_DEFAULTS, env={})
    assert result.returncode == 0, result.stderr
    engine, eager, backend, require_2fa = result.stdout.strip().splitlines()[-1].split()
    assert engine == "django.db.backends.sqlite3"
    assert eager == "True"
    assert backend == "portal.mail.ConsoleAndFileBackend"
    assert require_2fa == "False"


_PRINT_DEFAULTS = (
    "from django.conf import settings as s; "
    "print(s.DATABASES['default']['ENGINE'], s.CELERY_TASK_ALWAYS_EAGER, s.EMAIL_BACKEND, s.PORTAL_ADMIN_REQUIRE_2FA)"
)


def test_services_mode_is_configuration_only():
    env = {"DATABASE_URL": "postgres://u@db:5432/portal", "REDIS_URL": "redis://cache:6379/0"}
    result = manage("shell", "-c", _PRINT_DEFAULTS, env=env)
    assert result.returncode == 0, result.stderr
    engine, eager, _, _ = result.stdout.strip().splitlines()[-1].split()
    assert engine == "django.db.backends.postgresql" and eager == "False"
