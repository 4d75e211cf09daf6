"""Review-at-scale benchmark: `python -m access.bench [--applications 100000] [--requests 20]`.

On the database server of DATABASE_URL (PostgreSQL; SQLite only for a quick smoke run) it
creates a scratch database, builds the schema from the models, seeds --applications
applications (access.seeding), serves the portal in-process (Django's threaded WSGI server,
production settings, DEBUG off) on loopback and measures with a real HTTP client (requests)
signed in as a reviewer with password and TOTP code:

1. the admin queue's first page: default (no filter), a search, a country filter; and an
   application's change page: p50/p95 over --requests requests each, and the database
   queries each request ran;
2. bulk approve: the admin action "Approve selected" on --bulk submitted applications (called
   in-process, see bulk_approve); every email goes to the outbox (Notification rows counted);
3. the reviewer digest (access.services.digest.reviewer_digest_send), timed;
4. policy evaluation throughput (access.services.approval_policies.policy_throughput).

Targets: pages p95 < 300 ms, bulk approve of 500 < 60 s, policy >= 1,000 applications/s.
Prints the figures; the last line is a JSON object. The scratch database is dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

TARGET_PAGE_P95_MS = 300.0
TARGET_BULK_S = 60.0
TARGET_POLICY_PER_S = 1000.0
PASSWORD = "bench horse battery staple"


# --------------------------------------------------------------------------- the database


@contextmanager
def scratch_database(url: str) -> Iterator[str]:
    """A fresh database on the server of `url` (or a temporary SQLite file), dropped after."""
    if not url or url.startswith("sqlite"):
        with tempfile.TemporaryDirectory(prefix="access-bench-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.sqlite3'}"
        return
    import psycopg

    parts = urllib.parse.urlsplit(url)
    name = f"portal_bench_{secrets.token_hex(4)}"
    admin_url = urllib.parse.urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def configure_django(database_url: str, var_dir: Path) -> None:
    prefixes = ("DJANGO_", "PORTAL_", "WEIGHTS_", "DATABASE_", "REDIS_")
    for key in [k for k in os.environ if k.startswith(prefixes)]:
        del os.environ[key]
    os.environ.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(48),
        SECURE_SSL_REDIRECT="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        PORTAL_VAR_DIR=str(var_dir),
        DATABASE_URL=database_url,
        EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
        WEIGHTS_STORAGE="local",
        WEIGHTS_LOCAL_ROOT=str(var_dir / "storage"),
        LOG_LEVEL="ERROR",
    )
    import django

    django.setup()
    from django.conf import settings

    # The client speaks plain HTTP on loopback; production cookies are Secure-only.
    settings.SESSION_COOKIE_SECURE = False
    settings.CSRF_COOKIE_SECURE = False


def build_schema() -> None:
    """Tables and indexes from the models (as pytest --nomigrations does), plus the trigram
    indexes a migration adds on PostgreSQL (access.search_indexes)."""
    from django.apps import apps
    from django.conf import settings
    from django.core.management import call_command

    settings.MIGRATION_MODULES = {app.label: None for app in apps.get_app_configs()}
    call_command("migrate", run_syncdb=True, verbosity=0)
    call_command("createcachetable", verbosity=0)
    from django.db import connection

    from access.search_indexes import create_trigram_indexes

    with connection.schema_editor() as schema_editor:
        create_trigram_indexes(None, schema_editor)


# --------------------------------------------------------------------------- the server


class QueryCounter:
    """Queries per request, counted in the thread that serves it."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def wrap(self, app: Callable) -> Callable:
        from django.db import connection

        def counted(environ, start_response):
            seen = [0]

            def count(execute, sql, params, many, context):
                seen[0] += 1
                return execute(sql, params, many, context)

            with connection.execute_wrapper(count):
                body = b"".join(app(environ, start_response))
            self.counts.append(seen[0])
            return [body]

        return counted


@contextmanager
def portal_server(counter: QueryCounter) -> Iterator[str]:
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet)
    server.set_app(counter.wrap(WSGIHandler()))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the reviewer


def make_reviewer():
    from allauth.account.models import EmailAddress
    from allauth.mfa.totp.internal.auth import TOTP, generate_totp_secret
    from django.contrib.auth import get_user_model

    from access.services.reviewers import reviewers_group_ensure

    user = get_user_model().objects.create_user(
        username="bench-reviewer",
        email="bench-reviewer@portal.example.org",
        password=PASSWORD,
        is_staff=True,
    )
    user.groups.add(reviewers_group_ensure())
    EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
    secret = generate_totp_secret()
    TOTP.activate(user, secret)
    return user, secret


def totp_code(secret: str) -> str:
    from allauth.mfa import app_settings as mfa_settings
    from allauth.mfa.totp.internal.auth import (
        format_hotp_value,
        hotp_value,
        yield_hotp_counters_from_time,
    )

    if mfa_settings.TOTP_PERIOD - time.time() % mfa_settings.TOTP_PERIOD < 2:
        time.sleep(2)
    (counter,) = yield_hotp_counters_from_time()
    return format_hotp_value(hotp_value(secret, counter))


CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF_INPUT.search(html)
    if not found:
        raise RuntimeError("no CSRF token on the page")
    return found.group(1)


def sign_in(base: str, user, secret: str):
    import requests
    from django.urls import reverse

    session = requests.Session()
    login = base + reverse("account_login")
    page = session.get(login, timeout=30)
    answer = session.post(
        login,
        data={"login": user.email, "password": PASSWORD, "csrfmiddlewaretoken": csrf_of(page.text)},
        headers={"Referer": login},
        timeout=30,
    )
    mfa = base + reverse("mfa_authenticate")
    if not answer.url.startswith(mfa):
        raise RuntimeError(f"password login did not ask for the code: {answer.url}")
    answer = session.post(
        mfa,
        data={"code": totp_code(secret), "csrfmiddlewaretoken": csrf_of(answer.text)},
        headers={"Referer": mfa},
        timeout=30,
    )
    check = session.get(base + reverse("admin:access_application_changelist"), timeout=60)
    if check.status_code != 200 or "screening flags" not in check.text.lower():
        raise RuntimeError(f"the reviewer cannot open the queue: {check.status_code}")
    return session


# --------------------------------------------------------------------------- the measures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure_page(session, url: str, requests_n: int, counter: QueryCounter) -> dict:
    session.get(url, timeout=60)  # warm: templates, the connection
    times, queries = [], []
    for _ in range(requests_n):
        before = len(counter.counts)
        started = time.perf_counter()
        response = session.get(url, timeout=60)
        times.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: {response.status_code}")
        queries.extend(counter.counts[before:])
    return {
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(percentile(times, 0.95), 1),
        "queries": max(queries) if queries else None,
        "requests": requests_n,
    }


def bulk_approve(user, count: int) -> dict:
    """The admin action "Approve selected" on `count` rows, called as the changelist calls it.

    In-process rather than over HTTP: the portal caps a form at DATA_UPLOAD_MAX_NUMBER_FIELDS
    (200) fields, so a reviewer selects 500 rows with "select all" on a filtered queue; the
    action and everything it runs (services, outbox, webhooks, links) are the same.
    """
    from django.contrib import admin
    from django.contrib.messages.storage.fallback import FallbackStorage
    from django.contrib.sessions.backends.db import SessionStore
    from django.db import connection
    from django.test import RequestFactory

    from access.models import Application, Notification

    ids = list(
        Application.objects.filter(status=Application.Status.SUBMITTED, claimed_by__isnull=True)
        .order_by("submitted_at", "pk")
        .values_list("pk", flat=True)[:count]
    )
    model_admin = admin.site.get_model_admin(Application)
    request = RequestFactory().post("/admin/access/application/", {"confirm": "yes", "note": ""})
    request.user, request.session = user, SessionStore()
    request._messages = FallbackStorage(request)
    notifications = Notification.objects.count()
    queries = [0]

    def count_query(execute, sql, params, many, context):
        queries[0] += 1
        return execute(sql, params, many, context)

    started = time.perf_counter()
    with connection.execute_wrapper(count_query):
        model_admin.approve_selected(request, model_admin.get_queryset(request).filter(pk__in=ids))
    seconds = time.perf_counter() - started
    approved = Application.objects.filter(pk__in=ids, status=Application.Status.APPROVED).count()
    if approved != len(ids):
        raise RuntimeError(f"bulk approve: {approved}/{len(ids)} approved")
    return {
        "applications": len(ids),
        "seconds": round(seconds, 2),
        "notifications": Notification.objects.count() - notifications,
        "queries": queries[0],
    }


def digest() -> dict:
    from django.test import override_settings

    from access.services.digest import reviewer_digest_send

    with override_settings(PORTAL_REVIEWER_NOTIFICATIONS="daily"):
        started = time.perf_counter()
        sent = reviewer_digest_send()
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "emails": sent}


def policy(n: int) -> dict | str:
    try:
        from access.services.approval_policies import policy_throughput
    except ImportError:
        return "not available"
    figures = policy_throughput(n)
    return figures if isinstance(figures, dict) else {"applications_per_second": figures}


def run(args: argparse.Namespace) -> dict:
    with (
        tempfile.TemporaryDirectory(prefix="access-bench-var-") as var,
        scratch_database(args.database_url) as url,
    ):
        configure_django(url, Path(var))
        from django.db import connection
        from django.urls import reverse

        from access.models import Application
        from access.seeding import seed_applications

        build_schema()
        started = time.perf_counter()
        seeded = seed_applications(args.applications, seed=args.seed, batch_size=args.batch_size)
        seed_s = time.perf_counter() - started
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        print(
            f"seeded {seeded.applications} applications ({seeded.decided} decided, "
            f"{seeded.grants} grants) in {seed_s:.1f} s on {connection.vendor}",
            flush=True,
        )
        user, secret = make_reviewer()
        counter = QueryCounter()
        result: dict = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{os.cpu_count()} cores {platform.machine()} {platform.system()}",
            "database": connection.vendor,
            "applications": args.applications,
            "seed_s": round(seed_s, 1),
        }
        with portal_server(counter) as base:
            session = sign_in(base, user, secret)
            changelist = base + reverse("admin:access_application_changelist")
            sample = Application.objects.filter(status=Application.Status.SUBMITTED).order_by("pk")
            middle = sample[sample.count() // 2]
            pages = {
                "queue_default": changelist,
                "queue_search": changelist
                + "?"
                + urllib.parse.urlencode({"q": middle.full_name.split()[-1]}),
                "queue_country": changelist
                + "?"
                + urllib.parse.urlencode(
                    {"country": middle.country.code, "status__exact": "submitted"}
                ),
                "detail": base + reverse("admin:access_application_change", args=[middle.pk]),
            }
            for name, url_ in pages.items():
                result[name] = measure_page(session, url_, args.requests, counter)
                print(f"{name}: {result[name]}", flush=True)
            result["bulk_approve"] = bulk_approve(user, args.bulk)
            print(f"bulk_approve: {result['bulk_approve']}", flush=True)
        result["digest"] = digest()
        print(f"digest: {result['digest']}", flush=True)
        result["policy"] = policy(args.policy_n)
        print(f"policy: {result['policy']}", flush=True)
        connection.close()
    page_p95 = max(result[name]["p95_ms"] for name in pages)
    per_s = (
        result["policy"].get("applications_per_second")
        if isinstance(result["policy"], dict)
        else None
    )
    result["targets_met"] = {
        "pages_p95": page_p95 < TARGET_PAGE_P95_MS,
        "bulk_approve": result["bulk_approve"]["seconds"] < TARGET_BULK_S,
        "policy": per_s is not None and per_s >= TARGET_POLICY_PER_S,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m access.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--applications", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=20, help="Requests per page measured.")
    parser.add_argument("--bulk", type=int, default=500, help="Applications approved at once.")
    parser.add_argument("--policy-n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", ""),
        help="The server to create the scratch database on (default: DATABASE_URL; "
        "a temporary SQLite file when unset).",
    )
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
