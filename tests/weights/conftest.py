"""Storage fixtures: a local root per test, and a real S3 server (moto) on loopback."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.db import connection

from tests.conftest import skip_unless_required
from tests.servers import free_port
from weights.management.commands.generate_sample_release import MIB, write_sample_release
from weights.storage import S3Storage, get_storage, reset_storage

# Where portal/settings.py keeps the cache without REDIS_URL (migration portal 0002).
EMBEDDED_CACHE_TABLE = "portal_cache"
# What a portal subprocess needs, besides the endpoint and bucket, to use the moto server.
S3_KEYS = {"WEIGHTS_S3_REGION": "us-east-1", "WEIGHTS_S3_ADDRESSING_STYLE": "path"}
S3_KEYS |= {"WEIGHTS_S3_ACCESS_KEY_ID": "testing", "WEIGHTS_S3_SECRET_ACCESS_KEY": "testing"}


@dataclass(frozen=True)
class ServerStorage:
    """Where a portal subprocess keeps the weights: its environment, and what this test
    process needs to publish to the same place (see `share_storage`)."""

    mode: str  # "local" or "s3"
    env: dict[str, str]
    local_root: Path
    s3_endpoint: str = ""
    bucket: str = ""


@contextlib.contextmanager
def server_storage(request, tmp: Path, mode: str) -> Iterator[ServerStorage]:
    """Local storage under `tmp`, or a fresh bucket on the loopback S3 server (mode "s3")."""
    root = tmp / "weights"
    root.mkdir()
    if mode != "s3":
        yield ServerStorage(
            mode, {"WEIGHTS_STORAGE": "local", "WEIGHTS_LOCAL_ROOT": str(root)}, root
        )
        return
    endpoint = request.getfixturevalue("s3_server")
    bucket = f"portal-{uuid.uuid4().hex[:12]}"
    env = {"WEIGHTS_STORAGE": "s3", "WEIGHTS_S3_ENDPOINT_URL": endpoint, **S3_KEYS}
    env["WEIGHTS_S3_BUCKET"] = bucket
    with s3_bucket(endpoint, bucket):
        yield ServerStorage(mode, env, root, s3_endpoint=endpoint, bucket=bucket)


def share_storage(storage: ServerStorage, settings, monkeypatch) -> None:
    """Make this process publish where the server reads, with the server's cache empty (a
    flush leaves the cache table alone, and on SQLite the next test's link has the same id)."""
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {EMBEDDED_CACHE_TABLE}")  # noqa: S608
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # loopback, never a proxy
    if storage.mode == "s3":
        point_settings_at_s3(settings, storage.s3_endpoint, storage.bucket)
    else:
        settings.WEIGHTS_STORAGE = "local"
        settings.WEIGHTS_LOCAL_ROOT = storage.local_root
        reset_storage()


@contextlib.contextmanager
def s3_bucket(endpoint: str, bucket: str) -> Iterator[None]:
    """A bucket on the moto server for a module's portal subprocess, emptied and deleted after."""
    client = S3Storage(
        bucket=bucket,
        endpoint_url=endpoint,
        region=S3_KEYS["WEIGHTS_S3_REGION"],
        access_key_id=S3_KEYS["WEIGHTS_S3_ACCESS_KEY_ID"],
        secret_access_key=S3_KEYS["WEIGHTS_S3_SECRET_ACCESS_KEY"],
        addressing_style=S3_KEYS["WEIGHTS_S3_ADDRESSING_STYLE"],
        multipart_threshold=64 * MIB,
    ).client
    client.create_bucket(Bucket=bucket)
    yield
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def local_storage(settings, tmp_path):
    settings.WEIGHTS_STORAGE = "local"
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "store"
    reset_storage()
    yield get_storage()
    reset_storage()


@pytest.fixture(scope="session")
def s3_server() -> str:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        skip_unless_required("moto[server] is not installed: the loopback S3 server cannot start")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def point_settings_at_s3(settings, endpoint: str, bucket: str) -> None:
    settings.WEIGHTS_STORAGE = "s3"
    settings.WEIGHTS_S3_ENDPOINT_URL = endpoint
    settings.WEIGHTS_S3_BUCKET = bucket
    settings.WEIGHTS_S3_REGION = "us-east-1"
    settings.WEIGHTS_S3_ACCESS_KEY_ID = "testing"
    settings.WEIGHTS_S3_SECRET_ACCESS_KEY = "testing"
    settings.WEIGHTS_S3_ADDRESSING_STYLE = "path"
    reset_storage()


@pytest.fixture
def s3_storage(settings, s3_server, monkeypatch):
    # Loopback must never go through a proxy from the environment.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    bucket = f"weights-{uuid.uuid4().hex[:12]}"
    point_settings_at_s3(settings, s3_server, bucket)
    storage = get_storage()
    storage.client.create_bucket(Bucket=bucket)
    yield storage
    for page in storage.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            storage.client.delete_object(Bucket=bucket, Key=obj["Key"])
    storage.client.delete_bucket(Bucket=bucket)
    reset_storage()


@pytest.fixture
def dead_s3(settings, monkeypatch):
    """S3 settings pointing at a loopback port where nothing listens."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    point_settings_at_s3(settings, f"http://127.0.0.1:{free_port()}", "weights")
    yield get_storage()
    reset_storage()


@pytest.fixture
def sample_release_dir(tmp_path) -> Path:
    directory = tmp_path / "llama-7b"
    write_sample_release(directory, size_label="7B", shards=2, shard_bytes=MIB, seed=1)
    return directory


def stored_objects(root: Path) -> list[Path]:
    """Files under a local storage root, temporary ones included."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
