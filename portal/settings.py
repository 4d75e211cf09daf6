"""Settings for the portal, read from the environment.

Embedded mode (no DATABASE_URL / REDIS_URL) runs everything on one machine:
SQLite, in-process Celery, files and mail under var/. Services mode differs only
by configuration: PostgreSQL, Redis, SMTP. See README.md.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import dj_database_url
from csp.constants import NONCE, NONE, SELF, UNSAFE_INLINE
from django.core.exceptions import ImproperlyConfigured

from inference_demo.backend_config import parse_openai_backends
from portal.env import envbool, envchoice, envint, envlist, envstr

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(envstr("PORTAL_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = envbool("DEBUG", True)

_DEV_SECRET_KEY = "django-insecure-embedded-development-key-do-not-use-in-production"
SECRET_KEY = envstr("SECRET_KEY", _DEV_SECRET_KEY if DEBUG else "")
if not DEBUG and (len(SECRET_KEY) < 50 or SECRET_KEY == _DEV_SECRET_KEY):
    raise ImproperlyConfigured(
        "SECRET_KEY must be set to a random value of at least 50 characters when DEBUG is off"
    )

ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS")
SITE_URL = envstr("PORTAL_SITE_URL", "http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "portal.apps.PortalAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "rest_framework",
    "knox",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI served from here: no CDN, works offline
    "django_countries",
    "csp",
    "portal",
    "access",
    "weights",
    "inference_demo",
]

MIDDLEWARE = [
    # First, so that every response (redirects and refusals included) carries the id.
    "portal.request_id.RequestIdMiddleware",
    # Above CommonMiddleware: sees the final Content-Length before emptying a HEAD/304.
    "portal.http_middleware.BodylessResponseMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "portal.csp_middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "portal.http_middleware.CommonMiddleware",
    "portal.form_encoding.Utf8FormMiddleware",  # before anything reads request.POST
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.context_processors.portal",
            ],
        },
    },
]

try:
    DATABASES = {
        "default": dj_database_url.parse(
            envstr("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
            # Reusing connections raised download-endpoint throughput by a third on
            # PostgreSQL (see docs/benchmarks.md); health checks drop dead ones.
            conn_max_age=envint("DATABASE_CONN_MAX_AGE", 60, minimum=0),
            conn_health_checks=True,
        )
    }
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A database that went away gives a quick 503 (and /readyz a quick answer), not a hang.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", envint("DATABASE_CONNECT_TIMEOUT", 5, minimum=1)
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Embedded mode serves parallel range downloads from threads: take the write lock at
    # BEGIN (no lock-upgrade deadlocks), wait for it, and let readers run beside a writer.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = envstr("REDIS_URL", "")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured(
        f"REDIS_URL must start with redis://, rediss:// or unix://; got {REDIS_URL!r}"
    )

if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "portal.cache.FailOpenRedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
        }
    }
else:
    # Embedded mode runs several processes too (gunicorn workers, runserver, commands), and
    # rate-limit counters and used TOTP codes must be shared by all of them: a table in the
    # database (created by portal's first migration). Many entries, so that a flood of
    # keys cannot cull the counters that matter.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "portal_cache",
            "OPTIONS": {"MAX_ENTRIES": 100_000},
        }
    }

# Celery: with no broker configured, tasks run in-process (embedded mode).
CELERY_BROKER_URL = envstr("CELERY_BROKER_URL", REDIS_URL or "memory://")
CELERY_TASK_ALWAYS_EAGER = envbool("CELERY_TASK_ALWAYS_EAGER", not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = False
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {
    "access.tasks.deliver_notification": {"queue": "mail"},
    "weights.tasks.issue_download_link": {"queue": "mail"},
    "inference_demo.tasks.run_demo_request": {"queue": "demo"},
}
# A submission must not hang while the broker is down: publish fails fast and
# the outbox sweep delivers later.
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_TASK_PUBLISH_RETRY = False
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2, "socket_timeout": 5}
CELERY_BEAT_SCHEDULE = {
    "resend-undelivered-notifications": {
        "task": "access.tasks.sweep_outbox",
        "schedule": 300.0,
    },
    # Webhook retries fall due after their backoff; the sweep sends those that are due.
    "retry-due-webhook-deliveries": {
        "task": "access.tasks.sweep_webhooks",
        "schedule": 60.0,
    },
    "issue-missing-download-links": {
        "task": "weights.tasks.issue_missing_links",
        "schedule": 300.0,
    },
    "purge-old-demo-requests": {
        "task": "inference_demo.tasks.purge_demo_requests",
        "schedule": 24 * 3600.0,
    },
    "reviewer-daily-digest": {
        "task": "access.tasks.send_reviewer_digest",
        "schedule": 24 * 3600.0,
    },
    # Hourly, deduplicated per application and day: at most one reminder a day each.
    "remind-reviewers-of-waiting-applications": {
        "task": "access.tasks.remind_reviewers",
        "schedule": 3600.0,
    },
    "close-expired-download-links": {
        "task": "weights.tasks.close_expired_links",
        "schedule": 3600.0,
    },
    "flag-links-used-from-many-addresses": {
        "task": "weights.tasks.flag_shared_links",
        "schedule": 900.0,
    },
    # Journals of killed web processes (weights.services.event_journal).
    "flush-download-events": {
        "task": "weights.tasks.flush_download_events",
        "schedule": 60.0,
    },
    # Revoked grantees' fingerprinted copies written to storage (weights.tasks).
    "delete-revoked-fingerprinted-copies": {
        "task": "weights.tasks.delete_revoked_copies",
        "schedule": 900.0,
    },
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "home"
ACCOUNT_LOGOUT_REDIRECT_URL = "home"

# django-allauth: email is the identity and must be verified before login.
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = "mandatory"
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
ACCOUNT_CONFIRM_EMAIL_ON_GET = False
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[LLaMA access] "
ACCOUNT_RATE_LIMITS = {
    "login_failed": envstr("PORTAL_LOGIN_FAILED_RATE", "10/m/ip,5/5m/key"),
    "signup": "20/m/ip",
}
ACCOUNT_DEFAULT_HTTP_PROTOCOL = "http" if DEBUG else "https"
MFA_SUPPORTED_TYPES = ["totp", "recovery_codes"]
MFA_TOTP_ISSUER = envstr("PORTAL_TOTP_ISSUER", "LLaMA access portal")

# Staff need TOTP before the admin opens; only the embedded development mode
# (DEBUG) may relax this, and the admin says so on every page.
PORTAL_ADMIN_REQUIRE_2FA = envbool("PORTAL_ADMIN_REQUIRE_2FA", not DEBUG)
if not DEBUG and not PORTAL_ADMIN_REQUIRE_2FA:
    raise ImproperlyConfigured("PORTAL_ADMIN_REQUIRE_2FA may only be turned off when DEBUG is on")

EMAIL_BACKEND = envstr("EMAIL_BACKEND", "portal.mail.ConsoleAndFileBackend")
EMAIL_FILE_PATH = VAR_DIR / "mail"
EMAIL_HOST = envstr("EMAIL_HOST", "localhost")
EMAIL_PORT = envint("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = envstr("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = envstr("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = envint("EMAIL_TIMEOUT", 10, minimum=1)
DEFAULT_FROM_EMAIL = envstr("DEFAULT_FROM_EMAIL", "LLaMA access <noreply@localhost>")

# Successful submissions per user and sliding window, on every door (access.services.throttles).
PORTAL_SUBMIT_RATE = envstr("PORTAL_SUBMIT_RATE", "10/h")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "access.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["portal.api_parsers.JSONParser"],
    # JSON only, errors included: no browsable HTML pages (the docs are /api/docs/).
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_CLASSES": ["rest_framework.throttling.ScopedRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "review": envstr("PORTAL_REVIEW_API_RATE", "600/hour"),
    },
    "EXCEPTION_HANDLER": "portal.api_errors.exception_handler",
}
# API tokens (django-rest-knox, model access.ApiToken): only a SHA-512 digest is stored;
# the secret starts with "lap_" so secret scanners can recognise a leaked one.
KNOX_TOKEN_MODEL = "access.ApiToken"
# knox's own migrations would create its unused (swapped-out) table with a key to users.
MIGRATION_MODULES = {"knox": None}
PORTAL_API_TOKEN_DAYS = envint("PORTAL_API_TOKEN_DAYS", 30, minimum=1)
PORTAL_API_TOKEN_MAX_DAYS = envint("PORTAL_API_TOKEN_MAX_DAYS", 90, minimum=1)
# Reviewer tokens act on applications: they live at most this long.
PORTAL_STAFF_TOKEN_MAX_DAYS = envint("PORTAL_STAFF_TOKEN_MAX_DAYS", 7, minimum=1)
PORTAL_API_TOKENS_PER_USER = envint("PORTAL_API_TOKENS_PER_USER", 10, minimum=1)
# Tokens created per user and hour, on every door (revoking and creating again included).
PORTAL_API_TOKEN_CREATE_RATE = envstr("PORTAL_API_TOKEN_CREATE_RATE", "20/h")
REST_KNOX = {
    "TOKEN_PREFIX": "lap_",
    "TOKEN_TTL": timedelta(days=PORTAL_API_TOKEN_DAYS),
    "AUTO_REFRESH": False,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLaMA access portal API",
    "DESCRIPTION": (
        "Apply for, review and download model weight releases. Authenticate with a personal "
        "token (`Authorization: Bearer <token>`; see the apiToken scheme for how to get one). "
        "Every error is one JSON shape, the ErrorEnvelope: "
        '`{"detail": "...", "code": "...", "errors": {"field": ["..."]}}`, with `errors` '
        "filled in for invalid input fields and `{}` otherwise. docs/api.md walks through "
        "the whole journey."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "ApplicationStatusEnum": "access.models.Application.Status",
        "ArtifactVariantEnum": "weights.models.Artifact.Variant",
    },
    "TAGS": [
        {"name": "releases", "description": "The catalogue; anonymous."},
        {"name": "tokens", "description": "Personal API tokens."},
        {"name": "license", "description": "The license in effect, and accepting it."},
        {"name": "applications", "description": "Your applications for access."},
        {"name": "review", "description": "The review queue and decisions (reviewers)."},
        {"name": "grants", "description": "Your grants and their download links."},
        {"name": "demo", "description": "The hosted inference demo."},
    ],
}

# Bodies beyond this are refused: 400 for forms, 413 for the JSON API.
DATA_UPLOAD_MAX_MEMORY_SIZE = envint("PORTAL_MAX_BODY_BYTES", 256 * 1024, minimum=1024)
DATA_UPLOAD_MAX_NUMBER_FIELDS = 200

FORMS_URLFIELD_ASSUME_HTTPS = True
LANGUAGE_CODE = "en-gb"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
if not DEBUG:
    SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
# Load balancers and orchestrators probe over plain HTTP inside the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz/?$", r"^readyz/?$"]

# Content-Security-Policy (django-csp 4). Scripts run only from this origin or with the
# per-request nonce (`<script nonce="{{ request.csp_nonce }}">`). Inline styles stay
# allowed: templates use style attributes, which a nonce cannot cover. The Swagger UI
# page is no exception: its files and start-up script are served from this origin
# (portal/api_docs.py). CSP_REPORT_URI collects violations.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF, UNSAFE_INLINE],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "font-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
        "upgrade-insecure-requests": not DEBUG,
        "report-uri": envstr("CSP_REPORT_URI", "") or None,
    },
}

# JSON lines for log collectors in production, readable lines in development. Every line
# carries the request id (portal/request_id.py) and passes the token filter.
LOG_FORMAT = envchoice("LOG_FORMAT", "plain" if DEBUG else "json", ("plain", "json"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {"()": "portal.logging_json.JsonFormatter"},
    },
    "filters": {
        "request_id": {"()": "portal.request_id.RequestIdFilter"},
        "redact_tokens": {"()": "portal.logging_filters.RedactTokensFilter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id", "redact_tokens"],
        }
    },
    "root": {"handlers": ["console"], "level": envstr("LOG_LEVEL", "INFO")},
    "loggers": {
        # Replace Django's own handlers so that every line passes the token filter.
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.server": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.db.backends": {"level": "WARNING"},
        # The OpenAI client's transport logs every request at INFO (demo backends, probes).
        "httpx": {"level": "WARNING"},
    },
}

# --- Access workflow -------------------------------------------------------
PORTAL_INTENDED_USE_MAX_LENGTH = envint("PORTAL_INTENDED_USE_MAX_LENGTH", 4000, minimum=200)
PORTAL_RESTRICTED_COUNTRIES = [c.upper() for c in envlist("PORTAL_RESTRICTED_COUNTRIES", "")]
PORTAL_EXTRA_FREE_MAIL_DOMAINS = [d.lower() for d in envlist("PORTAL_EXTRA_FREE_MAIL_DOMAINS", "")]
PORTAL_REVIEWER_NOTIFICATIONS = envchoice(
    "PORTAL_REVIEWER_NOTIFICATIONS", "immediate", ("immediate", "daily")
)
PORTAL_REVIEWERS_GROUP = "Reviewers"
# An outbox row claimed by a worker that died is retried after this long.
PORTAL_OUTBOX_CLAIM_TIMEOUT_SECONDS = envint("PORTAL_OUTBOX_CLAIM_TIMEOUT_SECONDS", 300, minimum=10)
PORTAL_OUTBOX_MAX_ATTEMPTS = envint("PORTAL_OUTBOX_MAX_ATTEMPTS", 10, minimum=1)
# --- Webhooks (access.services.webhooks, docs/webhooks.md) ---
# Each POST waits at most this long; a failed one is tried again after BACKOFF_BASE, then
# twice as long each time (capped at six hours), and marked failed after MAX_ATTEMPTS.
PORTAL_WEBHOOK_TIMEOUT_SECONDS = envint("PORTAL_WEBHOOK_TIMEOUT_SECONDS", 5, minimum=1)
PORTAL_WEBHOOK_MAX_ATTEMPTS = envint("PORTAL_WEBHOOK_MAX_ATTEMPTS", 8, minimum=1)
PORTAL_WEBHOOK_BACKOFF_BASE_SECONDS = envint("PORTAL_WEBHOOK_BACKOFF_BASE_SECONDS", 30, minimum=1)
# --- end of webhooks ---
PORTAL_REQUIRE_SERVICES = envbool("PORTAL_REQUIRE_SERVICES", False)
# Reviewers are reminded of an application still awaiting review after this many days,
# at most once a day per application; 0 turns reminders off.
PORTAL_REVIEW_REMINDER_DAYS = envint("PORTAL_REVIEW_REMINDER_DAYS", 3, minimum=0)
# A reviewer's claim on an application (access.services.claims) lapses after this long.
PORTAL_REVIEW_CLAIM_MINUTES = envint("PORTAL_REVIEW_CLAIM_MINUTES", 30, minimum=1)

# --- Weights: storage, download links, serving ---------------------------------
WEIGHTS_STORAGE = envchoice("WEIGHTS_STORAGE", "local", ("local", "s3"))
WEIGHTS_LOCAL_ROOT = Path(envstr("WEIGHTS_LOCAL_ROOT", str(VAR_DIR / "weights")))
WEIGHTS_S3_BUCKET = envstr("WEIGHTS_S3_BUCKET", "")
WEIGHTS_S3_ENDPOINT_URL = envstr("WEIGHTS_S3_ENDPOINT_URL", "") or None
WEIGHTS_S3_REGION = envstr("WEIGHTS_S3_REGION", "us-east-1")
WEIGHTS_S3_ACCESS_KEY_ID = envstr("WEIGHTS_S3_ACCESS_KEY_ID", "") or None
WEIGHTS_S3_SECRET_ACCESS_KEY = envstr("WEIGHTS_S3_SECRET_ACCESS_KEY", "") or None
WEIGHTS_S3_ADDRESSING_STYLE = envchoice(
    "WEIGHTS_S3_ADDRESSING_STYLE", "path", ("path", "virtual", "auto")
)
WEIGHTS_S3_MULTIPART_THRESHOLD = envint(
    "WEIGHTS_S3_MULTIPART_THRESHOLD", 64 * 1024 * 1024, minimum=5 * 1024 * 1024
)
if WEIGHTS_STORAGE == "s3" and not WEIGHTS_S3_BUCKET:
    raise ImproperlyConfigured("WEIGHTS_STORAGE=s3 needs WEIGHTS_S3_BUCKET")
# A presigned GET is minted per request and lives at most 10 minutes.
WEIGHTS_PRESIGN_SECONDS = envint("WEIGHTS_PRESIGN_SECONDS", 300, minimum=10)
if WEIGHTS_PRESIGN_SECONDS > 600:
    raise ImproperlyConfigured("WEIGHTS_PRESIGN_SECONDS must be at most 600")
# When set (e.g. /protected-weights/), local files are handed to nginx with X-Accel-Redirect.
WEIGHTS_X_ACCEL_PREFIX = envstr("WEIGHTS_X_ACCEL_PREFIX", "")
WEIGHTS_LINK_LIFETIME_HOURS = envint("WEIGHTS_LINK_LIFETIME_HOURS", 24, minimum=1)
WEIGHTS_LINK_BUDGET_COPIES = envint("WEIGHTS_LINK_BUDGET_COPIES", 5, minimum=1)
WEIGHTS_LINK_MAX_IPS = envint("WEIGHTS_LINK_MAX_IPS", 5, minimum=1)
# Byte budgets (docs/downloads.md, "What a download costs"): bytes already charged to an
# address on a link are free to that address again for this long (resumes, retries,
# parallel clients), up to WEIGHTS_RESUME_FREE_COPIES copies' worth per file; each file also
# has WEIGHTS_BUDGET_SLACK_BYTES (at most its size) over N copies for what a cut leaves in
# network buffers when the resume comes from another address.
WEIGHTS_RESUME_WINDOW_SECONDS = envint("WEIGHTS_RESUME_WINDOW_SECONDS", 24 * 3600, minimum=0)
WEIGHTS_RESUME_FREE_COPIES = envint("WEIGHTS_RESUME_FREE_COPIES", 2, minimum=0)
WEIGHTS_BUDGET_SLACK_BYTES = envint("WEIGHTS_BUDGET_SLACK_BYTES", 16 * 1024 * 1024, minimum=0)
# The file endpoint's two statements run as prepared statements on PostgreSQL; turn off
# behind a transaction-mode connection pooler that does not support them.
WEIGHTS_PREPARED_STATEMENTS = envbool("WEIGHTS_PREPARED_STATEMENTS", True)
# Download events are appended to a per-process journal under this directory (a write
# that survives the process being killed) and inserted in batches.
WEIGHTS_EVENT_JOURNAL_DIR = Path(
    envstr("WEIGHTS_EVENT_JOURNAL_DIR", str(VAR_DIR / "download-events"))
)
WEIGHTS_EVENT_BATCH = envint("WEIGHTS_EVENT_BATCH", 500, minimum=1)
WEIGHTS_EVENT_FLUSH_SECONDS = envint("WEIGHTS_EVENT_FLUSH_SECONDS", 1, minimum=1)
WEIGHTS_FRESH_LINK_RATE = envstr("WEIGHTS_FRESH_LINK_RATE", "5/h")
# The Hugging Face Hub protocol names each release <namespace>/<slug>
# (HF_ENDPOINT=<portal> hf download research/llama-7b).
WEIGHTS_HUB_NAMESPACE = envstr("WEIGHTS_HUB_NAMESPACE", "research")
if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", WEIGHTS_HUB_NAMESPACE) or (
    WEIGHTS_HUB_NAMESPACE in {"api", "admin", "accounts", "d", "releases", "downloads", "demo"}
):
    raise ImproperlyConfigured(
        "WEIGHTS_HUB_NAMESPACE must be letters, digits, '-', '_' or '.', and not a portal path"
    )
# Expired links are closed (revoked, reason "Expired.") this long after expiry; until then
# the link's page still says precisely that it expired and when.
WEIGHTS_EXPIRED_LINK_GRACE_HOURS = envint("WEIGHTS_EXPIRED_LINK_GRACE_HOURS", 24, minimum=0)
# The periodic re-check flags links (and all links of a grant) used from more than
# WEIGHTS_LINK_MAX_IPS addresses within this window.
WEIGHTS_LINK_FLAG_WINDOW_HOURS = envint("WEIGHTS_LINK_FLAG_WINDOW_HOURS", 48, minimum=1)
# Fingerprinted releases on S3 (docs/fingerprinting.md, "With S3 storage"): each grantee's
# copy is written into the bucket, a full copy of the release per grant, and redirected to
# like any file. Off, such a release cannot be marked. The originals the copies are computed
# from are downloaded once into WEIGHTS_FINGERPRINT_CACHE (verified, content-addressed).
WEIGHTS_FINGERPRINT_MATERIALISE = envbool("WEIGHTS_FINGERPRINT_MATERIALISE", False)
# Preparing a grantee's copy (weights.tasks.prepare_recipient_copies) runs apart from the
# link task, with its own time limit: hashing (or writing out) a 65B release takes minutes
# to an hour. One run per grant, held for WEIGHTS_FINGERPRINT_LOCK_S and renewed per file.
WEIGHTS_FINGERPRINT_PREPARE_LIMIT_S = envint(
    "WEIGHTS_FINGERPRINT_PREPARE_LIMIT_S", 6 * 3600, minimum=60
)
WEIGHTS_FINGERPRINT_LOCK_S = envint("WEIGHTS_FINGERPRINT_LOCK_S", 1800, minimum=60)
WEIGHTS_FINGERPRINT_CACHE = Path(
    envstr("WEIGHTS_FINGERPRINT_CACHE", str(VAR_DIR / "fingerprint-originals"))
)

# --- Hosted demo -----------------------------------------------------------------
# slug=directory pairs of Meta-layout releases the demo worker holds.
DEMO_MODELS = {
    slug.strip(): Path(path.strip())
    for slug, _, path in (
        item.partition("=")
        for item in envlist(
            "DEMO_MODELS", f"llama-demo={BASE_DIR / 'inference_demo' / 'demo_model'}"
        )
    )
}
# Demo releases an OpenAI-compatible server (vLLM, TGI, llama.cpp, ...) answers instead of
# the built-in engine: a JSON object, see inference_demo/backend_config.py and
# docs/demo_backends.md. An entry overrides DEMO_MODELS for its slug.
DEMO_OPENAI_BACKENDS = parse_openai_backends(envstr("DEMO_OPENAI_BACKENDS", ""))
# In-process engine without Redis (embedded); a Celery worker on the demo queue with it.
DEMO_TRANSPORT = envchoice(
    "DEMO_TRANSPORT", "redis" if REDIS_URL else "inprocess", ("inprocess", "redis")
)
DEMO_DEVICE = envstr("DEMO_DEVICE", "auto")
DEMO_LIMITS = {
    "max_prompt_chars": envint("DEMO_MAX_PROMPT_CHARS", 2000, minimum=1),
    "max_new_tokens": envint("DEMO_MAX_NEW_TOKENS", 256, minimum=1),
    "max_temperature": 2.0,
    "concurrent_per_user": envint("DEMO_CONCURRENT_PER_USER", 2, minimum=1),
    "daily_tokens": envint("DEMO_DAILY_TOKENS", 20000, minimum=1),
    # An open request older than this no longer counts against the concurrency limit.
    "stale_after_s": 600,
}
DEMO_WORKER_WAIT_S = envint("DEMO_WORKER_WAIT_S", 5, minimum=1)
DEMO_RETENTION_DAYS = envint("DEMO_RETENTION_DAYS", 90, minimum=1)
