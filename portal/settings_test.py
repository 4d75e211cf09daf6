"""Test overrides: fast hashing, in-memory mail, in-process Celery by default.

Tests that need a real broker or worker switch to it explicitly.
"""

from __future__ import annotations

from portal.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_EAGER_PROPAGATES = True
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
PORTAL_ADMIN_REQUIRE_2FA = True
# Download events inserted before download_event_record returns, in the test's transaction.
WEIGHTS_EVENT_BATCH = 1

# A file, not SQLite's shared-cache memory database: live-server tests run requests in
# threads, and shared-cache mode turns every concurrent write into an immediate error
# instead of a short wait, which is not how the embedded portal behaves.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    import os
    import tempfile

    DATABASES["default"]["TEST"] = {  # noqa: F405
        "NAME": os.path.join(tempfile.gettempdir(), f"portal-test-{os.getpid()}.sqlite3")
    }
