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
    assert api.status_code == 503 and api.json()["error"] == "unavailable"


@pytest.mark.django_db
def test_other_errors_stay_500(settings, monkeypatch):
    settings.DEBUG = False
    monkeypatch.setattr("portal.views.license_current", lambda: 1 / 0)
    response = Client(raise_request_exception=False).get("/")
    assert response.status_code == 500
