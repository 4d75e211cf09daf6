"""DESIGN decision 6: the web process never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import django
django.setup()
from django.test import Client
import portal.urls, portal.wsgi  # noqa: F401
from django.urls import get_resolver
get_resolver().url_patterns
from django.contrib import admin
admin.autodiscover()
print("torch" in sys.modules, "transformers" in sys.modules)
"""


def test_web_process_imports_no_torch():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env={
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "PATH": "/usr/bin:/bin",
            "PORTAL_VAR_DIR": "/tmp/portal-notorch",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
