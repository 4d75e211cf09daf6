"""Liveness and readiness probes: what a load balancer sees when a dependency fails."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from django.db import OperationalError

from portal import health
from weights.storage import get_storage


@pytest.fixture
def ready(settings, tmp_path):
    """Embedded configuration that is ready: no Redis, a writable local weight store."""
    settings.REDIS_URL = ""
    settings.WEIGHTS_STORAGE = "local"
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "weights"
    return settings


def test_healthz_answers_without_the_database(client):
    # No `db` fixture: any query would fail the test.
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.content == b"ok"
    assert "no-cache" in response["Cache-Control"]


def test_readyz_reports_every_check(client, db, ready):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "redis": "skipped", "storage": "ok"},
    }
    assert (ready.WEIGHTS_LOCAL_ROOT).is_dir()


class _DownConnection:
    def cursor(self):
        raise OperationalError("connection refused")


def test_readyz_is_503_when_the_database_is_down(client, db, ready, monkeypatch):
    monkeypatch.setattr(health, "connection", _DownConnection())
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["failed"] == ["database"]
    assert body["checks"]["database"] == "error: OperationalError"
    assert "refused" not in response.content.decode()  # details go to the log only


def test_readyz_is_503_when_redis_does_not_answer(client, db, ready):
    ready.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["redis"]
    assert response.json()["checks"]["redis"] == "error: ConnectionError"


def test_readyz_pings_redis_when_configured(client, db, ready, monkeypatch):
    pinged = []

    class FakeRedis:
        def ping(self):
            pinged.append(True)

        def close(self):
            pass

    ready.REDIS_URL = "redis://cache:6379/0"
    monkeypatch.setattr(health, "redis_client", lambda url: FakeRedis())
    response = client.get("/readyz")
    assert response.status_code == 200 and response.json()["checks"]["redis"] == "ok"
    assert pinged == [True]


def test_readyz_against_a_real_redis(client, db, ready, redis_url):
    ready.REDIS_URL = redis_url
    assert client.get("/readyz").json()["checks"]["redis"] == "ok"


def test_readyz_is_503_when_local_storage_is_not_usable(client, db, ready, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    ready.WEIGHTS_LOCAL_ROOT = blocker / "weights"
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["storage"]


@pytest.mark.parametrize("bucket_exists", [True, False])
def test_readyz_checks_the_s3_bucket(client, db, ready, bucket_exists):
    ready.WEIGHTS_STORAGE = "s3"
    ready.WEIGHTS_S3_BUCKET = "weights"
    asked = []

    class FakeS3:
        def head_bucket(self, *, Bucket):  # noqa: N803 - boto3's spelling
            asked.append(Bucket)
            if not bucket_exists:
                raise ClientError({"Error": {"Code": "404"}}, "HeadBucket")
            return {}

    get_storage().__dict__["client"] = FakeS3()  # replaces the cached boto3 client
    response = client.get("/readyz")
    assert asked == ["weights"]
    if bucket_exists:
        assert response.status_code == 200 and response.json()["checks"]["storage"] == "ok"
    else:
        assert response.status_code == 503
        assert response.json()["checks"]["storage"] == "error: ClientError"


def test_probes_are_exempt_from_the_https_redirect(client, db, ready):
    ready.SECURE_SSL_REDIRECT = True
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    redirected = client.get("/releases/")
    assert redirected.status_code == 301 and redirected["Location"].startswith("https://")


def test_probes_only_read(client, db, ready):
    assert client.post("/healthz").status_code == 405
    assert client.head("/readyz").status_code == 200
