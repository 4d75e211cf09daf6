"""Storage fixtures: a local root per test, and a real S3 server (moto) on loopback."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import skip_unless_required
from tests.servers import free_port
from weights.management.commands.generate_sample_release import MIB, write_sample_release
from weights.storage import S3Storage, get_storage, reset_storage

# What a portal subprocess needs, besides the endpoint and bucket, to use the moto server.
S3_KEYS = {"WEIGHTS_S3_REGION": "us-east-1", "WEIGHTS_S3_ADDRESSING_STYLE": "path"}
S3_KEYS |= {"WEIGHTS_S3_ACCESS_KEY_ID": "testing", "WEIGHTS_S3_SECRET_ACCESS_KEY": "testing"}


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
