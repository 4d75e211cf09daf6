"""Where weight bytes live: a local directory or an S3-compatible bucket.

Keys are relative POSIX paths chosen by the portal (content-addressed, see
`weights.services.publishing`). `get_storage()` returns the configured backend,
cached; tests call `reset_storage()` after changing settings.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import quote

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from django.conf import settings
from django.core.signals import setting_changed

Progress = Callable[[int], object]


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


_COPY_CHUNK = 8 * 1024 * 1024
# S3 allows at most 10,000 parts per upload; stay clear of it for very large files.
_MAX_PARTS = 9_000


class StorageError(Exception):
    """The storage backend refused an operation."""


class StorageUnavailable(StorageError):
    """The storage backend cannot be reached (endpoint down, bucket missing, bad credentials)."""


class InvalidKey(StorageError, ValueError):
    """A key that is empty, absolute or would escape the storage root."""


def validate_key(key: str) -> str:
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise InvalidKey(f"invalid storage key {key!r}")
    return key


class WeightStorage(ABC):
    @abstractmethod
    def put(self, key: str, source: Path, *, size: int, progress: Progress | None = None) -> bool:
        """Store `source` under `key`; False (and no transfer) when an object of `size` is there."""

    @abstractmethod
    def put_stream(self, key: str, stream: Readable, *, size: int) -> None:
        """Store what `stream` yields under `key`, read once from start to end (so the caller
        may hash as it reads); StorageError unless exactly `size` bytes were stored."""

    @abstractmethod
    def size_of(self, key: str) -> int | None:
        """The stored object's size, or None when there is none."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def local_path(self, key: str) -> Path | None:
        """A filesystem path for the key when the bytes are on this machine, else None."""

    @abstractmethod
    def presigned_get(
        self, key: str, *, expires_in: int, filename: str, byte_range: str | None = None
    ) -> str:
        """A URL that lets a client GET the object directly, as an attachment named `filename`."""

    @abstractmethod
    def open(self, key: str) -> IO[bytes]:
        """A readable binary stream of the object; FileNotFoundError when there is none."""


class LocalStorage(WeightStorage):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        # A symlink inside the root must not lead outside it either.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise InvalidKey(f"invalid storage key {key!r}")
        return path

    def put(self, key: str, source: Path, *, size: int, progress: Progress | None = None) -> bool:
        if self.size_of(key) == size:
            return False
        with open(source, "rb") as src:
            self._write(key, src, size=size, what=source, progress=progress)
        return True

    def put_stream(self, key: str, stream: Readable, *, size: int) -> None:
        self._write(key, stream, size=size, what=key)

    def _write(
        self, key: str, src: Readable, *, size: int, what: object, progress: Progress | None = None
    ) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so a crash never leaves a half file under the key.
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                copied = _copy(src, out, progress)
                out.flush()
                os.fsync(out.fileno())
            if copied != size:
                raise StorageError(f"{what} is {copied} bytes, expected {size}: did it change?")
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def size_of(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def presigned_get(
        self, key: str, *, expires_in: int, filename: str, byte_range: str | None = None
    ) -> str:
        raise NotImplementedError("local storage is served by the portal, not by presigned URLs")

    def open(self, key: str) -> IO[bytes]:
        return open(self._path(key), "rb")  # noqa: SIM115 - the caller closes it


def _copy(src: Readable, out: IO[bytes], progress: Progress | None) -> int:
    copied = 0
    while chunk := src.read(_COPY_CHUNK):
        out.write(chunk)
        copied += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return copied


class S3Storage(WeightStorage):
    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
        addressing_style: str,
        multipart_threshold: int,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self._client_kwargs: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region_name": region,
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
        }
        self._addressing_style = addressing_style

    @functools.cached_property
    def client(self) -> Any:
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": self._addressing_style},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
        )
        # A session of its own: boto3's default session is not thread-safe, clients are.
        return boto3.session.Session().client("s3", config=config, **self._client_kwargs)

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        where = f"s3://{self.bucket}/{key}"
        try:
            yield
        except (BotoConnectionError, HTTPClientError, NoCredentialsError) as exc:
            endpoint = self.endpoint_url or "AWS S3"
            raise StorageUnavailable(
                f"weight storage at {endpoint} is unreachable ({action} {where}): {exc}"
            ) from exc
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404") and action == "open":
                raise FileNotFoundError(where) from exc
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "403"):
                raise StorageUnavailable(f"cannot {action} {where}: {code}") from exc
            raise StorageError(f"cannot {action} {where}: {exc}") from exc
        except (S3UploadFailedError, BotoCoreError) as exc:
            raise StorageError(f"cannot {action} {where}: {exc}") from exc

    def put(self, key: str, source: Path, *, size: int, progress: Progress | None = None) -> bool:
        validate_key(key)
        if self.size_of(key) == size:
            return False
        with self._errors("upload", key):
            self.client.upload_file(
                str(source),
                self.bucket,
                key,
                ExtraArgs={"ContentType": "application/octet-stream"},
                Config=self._transfer_config(size),
                Callback=progress,
            )
        self._check_stored(key, size, source)
        return True

    def _transfer_config(self, size: int) -> TransferConfig:
        chunk = max(self.multipart_threshold, math.ceil(size / _MAX_PARTS))
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=chunk,
            max_concurrency=4,
        )

    def _check_stored(self, key: str, size: int, what: object) -> None:
        stored = self.size_of(key)
        if stored != size:
            self.delete(key)
            raise StorageError(f"{what} uploaded as {stored} bytes, expected {size}")

    def put_stream(self, key: str, stream: Readable, *, size: int) -> None:
        validate_key(key)
        config = self._transfer_config(size)
        # A stream's parts wait in memory until sent (10 by default): keep fewer.
        config.max_in_memory_upload_chunks = config.max_concurrency
        with self._errors("upload", key):
            # Multipart, parts read in order: `stream` is read exactly once.
            self.client.upload_fileobj(
                _Sequential(stream),
                self.bucket,
                key,
                ExtraArgs={"ContentType": "application/octet-stream"},
                Config=config,
            )
        self._check_stored(key, size, key)

    def size_of(self, key: str) -> int | None:
        validate_key(key)
        with self._errors("inspect", key):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def local_path(self, key: str) -> Path | None:
        return None

    def presigned_get(
        self, key: str, *, expires_in: int, filename: str, byte_range: str | None = None
    ) -> str:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": validate_key(key),
            "ResponseContentDisposition": content_disposition(filename),
        }
        if byte_range:
            # Signed in: the client must send exactly this Range, so the budget charge holds.
            params["Range"] = byte_range
        with self._errors("sign", key):
            return self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=expires_in
            )

    def open(self, key: str) -> IO[bytes]:
        validate_key(key)
        with self._errors("open", key):
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]


class _Sequential:
    """Only `read`, returning all that was asked for until the end: s3transfer then reads
    the stream once, in order (no seek back), and sizes every part as configured."""

    def __init__(self, stream: Readable) -> None:
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self._stream.read()
        parts, want = [], n
        while want > 0 and (chunk := self._stream.read(want)):
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback and the exact UTF-8 name (RFC 6266)."""
    name = os.path.basename(filename.replace("\\", "/")) or "download"
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


@functools.cache
def get_storage() -> WeightStorage:
    if settings.WEIGHTS_STORAGE == "s3":
        return S3Storage(
            bucket=settings.WEIGHTS_S3_BUCKET,
            endpoint_url=settings.WEIGHTS_S3_ENDPOINT_URL,
            region=settings.WEIGHTS_S3_REGION,
            access_key_id=settings.WEIGHTS_S3_ACCESS_KEY_ID,
            secret_access_key=settings.WEIGHTS_S3_SECRET_ACCESS_KEY,
            addressing_style=settings.WEIGHTS_S3_ADDRESSING_STYLE,
            multipart_threshold=settings.WEIGHTS_S3_MULTIPART_THRESHOLD,
        )
    return LocalStorage(settings.WEIGHTS_LOCAL_ROOT)


def reset_storage() -> None:
    get_storage.cache_clear()


def _reset_on_setting_change(*, setting: str, **kwargs: object) -> None:
    if setting.startswith("WEIGHTS_"):
        reset_storage()


setting_changed.connect(_reset_on_setting_change)
