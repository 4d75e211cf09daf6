from __future__ import annotations

import pytest
from django.db import OperationalError
from django.test import Client

from portal import errors


@pytest.fixture
def broken_home(monkeypatch):
    def down(**kwargs):
        raise OperationalError("connection to server at 127.0.0.1 failed: Connection refused")

    monkeypatch.setattr("portal.views.license_current", lambda: down())


@pytest.mark.django_db
def test_database_down_is_a_clean_503_with_retry_after(settings, broken_home):
    settings.DEBUG = False
    client = Client(raise_request_exception=False)
    response = client.get("/")
    assert response.status_code == 503
    assert response["Retry-After"] == "30"
    assert response.content.decode() == errors.UNAVAILABLE
    api = client.get("/", HTTP_ACCEPT="application/json")
    assert api.status_code == 503
    assert api.json() == {"detail": errors.UNAVAILABLE, "code": "unavailable", "errors": {}}


@pytest.mark.django_db
def test_other_errors_stay_500(settings, monkeypatch):
    settings.DEBUG = False
    monkeypatch.setattr("portal.views.license_current", lambda: 1 / 0)
    response = Client(raise_request_exception=False).get("/")
    assert response.status_code == 500


@pytest.mark.django_db
def test_an_api_500_is_the_envelope_not_an_html_page(settings, monkeypatch):
    settings.DEBUG = False

    def boom(*args, **kwargs):
        raise ZeroDivisionError

    monkeypatch.setattr("weights.api.selectors.catalogue", boom)
    response = Client(raise_request_exception=False).get("/api/releases/")
    assert response.status_code == 500
    assert response.json() == {"detail": errors.SERVER_ERROR, "code": "server_error", "errors": {}}


@pytest.mark.django_db
def test_form_bodies_under_the_api_are_refused_in_the_envelope(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    client = Client()
    latin1 = client.post(
        "/api/applications/", b"full_name=Ren\xe9", content_type="application/x-www-form-urlencoded"
    )
    assert latin1.status_code == 400
    assert latin1.json()["code"] == "not_utf8" and latin1.json()["errors"] == {}
    big = client.post(
        "/api/applications/", b"a=" + b"x" * 2000, content_type="application/x-www-form-urlencoded"
    )
    assert big.status_code == 413 and big.json()["code"] == "body_too_large"
    broken = client.post("/api/applications/", b"--x\r\nbroken", content_type="multipart/form-data")
    assert broken.status_code == 400 and set(broken.json()) == {"detail", "code", "errors"}
    page = client.post(
        "/apply/", b"a=" + b"x" * 2000, content_type="application/x-www-form-urlencoded"
    )
    assert page.status_code == 400 and "json" not in page["Content-Type"]
