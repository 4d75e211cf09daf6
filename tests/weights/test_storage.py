from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import pytest

from tests.weights.conftest import stored_objects
from weights.checksums import ChecklistError, file_digests, parse_checklist
from weights.storage import (
    InvalidKey,
    LocalStorage,
    S3Storage,
    StorageUnavailable,
    content_disposition,
    get_storage,
    reset_storage,
)

MIB = 1024 * 1024
KEY = "sha256/ab/abcdef"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def fetch(url: str, headers: dict[str, str] | None = None):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
        return response.status, response.headers, response.read()


# --- checksums ---------------------------------------------------------------


def test_file_digests_streams_in_chunks(tmp_path):
    data = os.urandom(100_000)
    seen: list[int] = []
    sha256, md5, size = file_digests(
        write(tmp_path / "f", data), chunk_size=4096, progress=seen.append
    )
    assert (sha256, md5, size) == (
        hashlib.sha256(data).hexdigest(),
        hashlib.md5(data).hexdigest(),
        len(data),
    )
    assert len(seen) == 25 and sum(seen) == len(data)


def test_parse_checklist_text_and_binary_modes():
    text = (
        "0123456789abcdef0123456789ABCDEF  consolidated.00.pth\n"
        "\n"
        "fedcba9876543210fedcba9876543210 *params.json\r\n"
        "00000000000000000000000000000000  ./name with spaces.bin\n"
    )
    assert parse_checklist(text) == {
        "consolidated.00.pth": "0123456789abcdef0123456789abcdef",
        "params.json": "fedcba9876543210fedcba9876543210",
        "name with spaces.bin": "00000000000000000000000000000000",
    }


@pytest.mark.parametrize(
    "line",
    ["deadbeef  short.bin", "0123456789abcdef0123456789abcdef", "not a checklist line at all"],
)
def test_parse_checklist_rejects_malformed_lines(line):
    with pytest.raises(ChecklistError, match="line 2 is not"):
        parse_checklist("0123456789abcdef0123456789abcdef  ok.bin\n" + line + "\n")


# --- local storage -----------------------------------------------------------


def test_get_storage_follows_settings_and_is_cached(settings, tmp_path):
    settings.WEIGHTS_STORAGE = "local"
    settings.WEIGHTS_LOCAL_ROOT = tmp_path
    storage = get_storage()
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path
    assert get_storage() is storage
    reset_storage()
    assert get_storage() is not storage


def test_local_put_open_size_delete(local_storage, tmp_path):
    data = os.urandom(3 * MIB + 7)
    progress: list[int] = []
    assert local_storage.put(
        KEY, write(tmp_path / "src", data), size=len(data), progress=progress.append
    )
    assert sum(progress) == len(data)
    assert local_storage.size_of(KEY) == len(data)
    assert local_storage.local_path(KEY) == tmp_path / "store" / KEY
    assert (tmp_path / "store" / KEY).read_bytes() == data
    with local_storage.open(KEY) as f:
        assert f.read() == data
    local_storage.delete(KEY)
    assert local_storage.size_of(KEY) is None
    with pytest.raises(FileNotFoundError):
        local_storage.open(KEY)


def test_local_put_is_idempotent(local_storage, tmp_path):
    source = write(tmp_path / "src", b"weights")
    assert local_storage.put(KEY, source, size=7) is True
    before = os.stat(local_storage.local_path(KEY)).st_ino
    assert local_storage.put(KEY, source, size=7) is False
    assert os.stat(local_storage.local_path(KEY)).st_ino == before


def test_local_put_failure_leaves_no_partial_file(local_storage, tmp_path):
    source = write(tmp_path / "src", os.urandom(20 * MIB))

    def fail_midway(n: int) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        local_storage.put(KEY, source, size=20 * MIB, progress=fail_midway)
    assert local_storage.size_of(KEY) is None
    assert stored_objects(tmp_path / "store") == []


@pytest.mark.parametrize(
    "key", ["", "../outside", "a/../../outside", "/etc/passwd", "a//b", "a\\..\\b", "a/./b"]
)
def test_local_keys_cannot_escape_the_root(local_storage, tmp_path, key):
    source = write(tmp_path / "src", b"x")
    with pytest.raises(InvalidKey):
        local_storage.put(key, source, size=1)
    with pytest.raises(InvalidKey):
        local_storage.open(key)
    assert not (tmp_path / "outside").exists()


def test_local_storage_does_not_presign(local_storage):
    with pytest.raises(NotImplementedError):
        local_storage.presigned_get(KEY, expires_in=60, filename="x")


def test_content_disposition_is_an_attachment_with_a_safe_name():
    assert content_disposition("7B/consolidated.00.pth") == (
        "attachment; filename=\"consolidated.00.pth\"; filename*=UTF-8''consolidated.00.pth"
    )
    assert content_disposition('a"b\\c.bin').startswith('attachment; filename="c.bin"')


# --- S3 (moto's server on loopback) ------------------------------------------


def test_s3_put_open_size_delete(s3_storage, tmp_path):
    assert isinstance(s3_storage, S3Storage)
    data = os.urandom(MIB + 3)
    assert s3_storage.put(KEY, write(tmp_path / "src", data), size=len(data)) is True
    assert s3_storage.put(KEY, tmp_path / "src", size=len(data)) is False
    assert s3_storage.size_of(KEY) == len(data)
    assert s3_storage.local_path(KEY) is None
    body = s3_storage.open(KEY)
    assert body.read() == data
    s3_storage.delete(KEY)
    assert s3_storage.size_of(KEY) is None
    with pytest.raises(FileNotFoundError):
        s3_storage.open(KEY)


def test_s3_large_file_goes_multipart(settings, s3_storage, tmp_path):
    settings.WEIGHTS_S3_MULTIPART_THRESHOLD = 5 * MIB
    storage = get_storage()
    assert storage.multipart_threshold == 5 * MIB
    data = os.urandom(11 * MIB)
    progress: list[int] = []
    storage.put(KEY, write(tmp_path / "big", data), size=len(data), progress=progress.append)
    head = storage.client.head_object(Bucket=storage.bucket, Key=KEY)
    assert "-" in head["ETag"]
    assert head["ContentLength"] == len(data)
    assert sum(progress) == len(data)
    assert storage.open(KEY).read() == data


def test_s3_presigned_get_serves_the_bytes_and_ranges(s3_storage, tmp_path):
    data = os.urandom(256 * 1024)
    s3_storage.put(KEY, write(tmp_path / "src", data), size=len(data))

    url = s3_storage.presigned_get(KEY, expires_in=60, filename="7B/consolidated.00.pth")
    status, headers, body = fetch(url)
    assert status == 200 and body == data
    assert 'filename="consolidated.00.pth"' in headers["Content-Disposition"]

    url = s3_storage.presigned_get(
        KEY, expires_in=60, filename="consolidated.00.pth", byte_range="bytes=1000-1999"
    )
    assert "range" in url.lower()  # the Range header is part of the signature
    status, headers, body = fetch(url, {"Range": "bytes=1000-1999"})
    assert status == 206 and body == data[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"


def test_s3_unreachable_is_a_clear_error(dead_s3, tmp_path):
    with pytest.raises(StorageUnavailable, match="unreachable"):
        dead_s3.size_of(KEY)
    with pytest.raises(StorageUnavailable, match="unreachable"):
        dead_s3.put(KEY, write(tmp_path / "src", b"x"), size=1)
