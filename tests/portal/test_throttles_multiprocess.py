"""Rate limits hold across processes: gunicorn with deploy/gunicorn.conf.py and 3 workers.

Production settings (DEBUG=0), a fresh SQLite database migrated as `make migrate` does,
and every request over a new connection, so that the attempts spread over the workers: a
limit kept in one worker's memory lets three times as many through. The access log names
the worker (pid) of each request: the tests start once all three have answered.
Run against the embedded default (the database cache) and, with REDIS_URL, Redis.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

import pytest

from access.services.throttles import SUBMIT_RATE_LIMITED
from tests.conftest import FIELDS, require_service
from tests.servers import BIN, ROOT, free_port, process_env, started, wait_for
from weights.views import FRESH_LINK_LIMITED

CSRF = secrets.token_hex(16)  # any 32 characters do as the cookie, if the form sends them too
PASSWORD = "correct horse battery staple"
SUBMIT_RATE, FRESH_LINK_RATE = 3, 2


def _id() -> int:
    return 10**6 + secrets.randbelow(10**9)


def setup_script() -> str:
    """Users, a license, a release and a grant; prints the sessions and ids the tests use."""
    return f"""
import json
from importlib import import_module
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from access.models import Grant
from access.services.applications import application_save_draft, application_submit
from access.services.reviews import application_approve
from tests.factories import (
    LicenseVersionFactory, ReleaseFactory, ReviewerFactory, UserFactory, accept_license,
)

def session_for(user):
    store = import_module(settings.SESSION_ENGINE).SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    return store.session_key

license = LicenseVersionFactory(version="1")
release = ReleaseFactory(slug="llama-7b", name="LLaMA 7B")
# Counters in Redis outlive this database: fresh ids and addresses keep runs apart.
target = UserFactory(id={_id()}, username="target", email="t{_id()}@uni.example.edu")
submitter = UserFactory(id={_id()}, username="submitter")
downloader = UserFactory(id={_id()}, username="downloader")
fields = {FIELDS!r}
draft = application_save_draft(applicant=downloader, fields=fields, releases=[release])
submitted = application_submit(
    application=draft, applicant=downloader, license_acceptance=accept_license(downloader, license)
)
application_approve(application=submitted, reviewer=ReviewerFactory(), releases=[release])
print(json.dumps({{
    "target": target.email,
    "submitter": session_for(submitter),
    "downloader": session_for(downloader),
    "grant": Grant.objects.get(user=downloader).pk,
}}))
"""


def manage(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(BIN / "python"), "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


class Browser:
    """One visitor: its own cookies and address, a new connection for every request."""

    def __init__(self, port: int, cookies: dict[str, str] | None = None) -> None:
        self.port = port
        self.cookies = {"csrftoken": CSRF, **(cookies or {})}
        # gunicorn trusts loopback to name the client, as it trusts nginx in the stack.
        self.ip = f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250)}"

    def request(
        self, method: str, path: str, *, form: dict | None = None, body: dict | None = None
    ) -> tuple[int, dict[str, str], str]:
        headers = {
            "Host": "127.0.0.1",
            "Connection": "close",
            "X-Forwarded-For": self.ip,
            "X-CSRFToken": CSRF,
            "Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items()),
        }
        data = None
        if form is not None:
            data = urlencode({**form, "csrfmiddlewaretoken": CSRF}, doseq=True)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            text = response.read().decode()
            for header in response.headers.get_all("Set-Cookie") or []:
                for name, morsel in SimpleCookie(header).items():
                    if morsel["max-age"] == "0" or not morsel.value:
                        self.cookies.pop(name, None)
                    else:
                        self.cookies[name] = morsel.value
            return response.status, dict(response.getheaders()), text
        finally:
            connection.close()


@pytest.fixture(scope="module", params=["database cache", "redis"])
def portal(request, tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("throttles")
    redis_url = ""
    if request.param == "redis":
        redis_url = os.environ.get("REDIS_URL", "")
        require_service("redis", redis_url)
    port = free_port()
    env = process_env({})
    env.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="127.0.0.1",
        SECURE_SSL_REDIRECT="0",
        DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}",
        REDIS_URL=redis_url,
        CELERY_TASK_ALWAYS_EAGER="1",
        EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
        PORTAL_VAR_DIR=str(tmp / "var"),
        WEIGHTS_LOCAL_ROOT=str(tmp / "weights"),
        PORTAL_SUBMIT_RATE=f"{SUBMIT_RATE}/h",
        WEIGHTS_FRESH_LINK_RATE=f"{FRESH_LINK_RATE}/h",
        GUNICORN_BIND=f"127.0.0.1:{port}",
        GUNICORN_WORKERS="3",
        GUNICORN_LOG_LEVEL="warning",
    )
    (tmp / "var").mkdir()
    manage("migrate", "--noinput", env=env)
    setup = json.loads(manage("shell", "-c", setup_script(), env=env).strip().splitlines()[-1])
    log = tmp / "gunicorn.log"
    command = [
        str(BIN / "gunicorn"),
        "-c",
        "deploy/gunicorn.conf.py",
        "--access-logformat",
        'pid=%(p)s "%(r)s" %(s)s',
    ]

    def all_workers_answered() -> bool:
        # Back to back while they answer, so that new connections reach the idle workers.
        for _ in range(20):
            if len(workers_that_served(log, "GET", "/healthz")) >= 3:
                return True
            if not _healthy(port):
                return False
        return False

    with started(command, env=env, log=log) as server:
        # Up once each of the 3 workers has answered a new connection: from then on they
        # share the requests, as they share the attacker's in production.
        wait_for(all_workers_answered, "3 gunicorn workers", log=log, timeout=90, process=server)
        yield {"port": port, **setup}


def _healthy(port: int) -> bool:
    try:
        return Browser(port).request("GET", "/healthz")[0] == 200
    except OSError:
        return False


def workers_that_served(log: Path, method: str, path: str) -> set[str]:
    """The pids of the workers whose access log shows `method path` (a regular expression)."""
    pattern = re.compile(rf'^pid=<(\d+)> "{method} {path} ', re.M)
    return set(pattern.findall(log.read_text()))


def test_the_sixth_failed_login_for_an_address_is_refused_whichever_worker_gets_it(portal):
    attempts = []
    for _ in range(5):
        status, _, page = Browser(portal["port"]).request(
            "POST", "/accounts/login/", form={"login": portal["target"], "password": "wrong"}
        )
        attempts.append((status, "not correct" in page))
    assert attempts == [(200, True)] * 5

    # Even the right password, from a new address, waits: the limit is per address (5/5m/key).
    browser = Browser(portal["port"])
    status, _, page = browser.request(
        "POST", "/accounts/login/", form={"login": portal["target"], "password": PASSWORD}
    )
    assert (status, "Too many failed login attempts" in page) == (200, True)
    assert "sessionid" not in browser.cookies


def test_failed_submissions_are_free_and_the_allowance_holds_across_workers(portal):
    browser = Browser(portal["port"], {"sessionid": portal["submitter"]})

    def draft() -> int:
        body = {**FIELDS, "releases": ["llama-7b"]}
        status, _, text = browser.request("POST", "/api/applications/", body=body)
        assert status == 201, text
        return json.loads(text)["id"]

    def submit(pk: int, body: dict) -> tuple[int, dict[str, str], str]:
        return browser.request("POST", f"/api/applications/{pk}/submit/", body=body)

    first = draft()
    failed = [submit(first, {})[0] for _ in range(SUBMIT_RATE + 2)]
    assert failed == [400] * (SUBMIT_RATE + 2)
    statuses = [submit(first, {"accept_license": True})[0] for _ in range(3)]
    assert statuses == [200, 409, 409]

    def withdraw(pk: int) -> None:
        assert browser.request("POST", f"/api/applications/{pk}/withdraw/")[0] == 200

    for _ in range(SUBMIT_RATE - 1):
        withdraw(first)
        first = draft()
        assert submit(first, {"accept_license": True})[0] == 200

    withdraw(first)
    status, headers, text = submit(draft(), {"accept_license": True})
    assert status == 429, text
    assert json.loads(text) == {"detail": SUBMIT_RATE_LIMITED, "code": "throttled", "errors": {}}
    assert int(headers["Retry-After"]) > 3000


def test_fresh_links_are_limited_across_workers(portal):
    browser = Browser(portal["port"], {"sessionid": portal["downloader"]})
    path = f"/downloads/{portal['grant']}/fresh-link/"
    pages = []
    for _ in range(FRESH_LINK_RATE + 2):
        status, headers, _ = browser.request("POST", path)
        assert status == 302, status
        pages.append(browser.request("GET", headers["Location"])[2])
    issued = ["previous link no longer works" in page for page in pages]
    refused = [FRESH_LINK_LIMITED in page for page in pages]
    assert issued == [True] * FRESH_LINK_RATE + [False, False]
    assert refused == [False] * FRESH_LINK_RATE + [True, True]
