"""A fingerprinted release in S3: with WEIGHTS_FINGERPRINT_MATERIALISE each grantee's copy is
written into the bucket by the link task, hashed as it is uploaded, and served like any S3
file (a presigned redirect, charged and recorded as one); without it, marking is refused.

The bundled demo model (bfloat16, two model-parallel shards) is published as llama-7b into a
bucket on the loopback S3 server (moto), marked, and granted to two researchers.
"""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import pytest
from django.core import mail
from huggingface_hub import hf_hub_download

from access.services import reviews
from access.tokens import token_create
from tests.weights.fingerprinted import DEMO, approve, publish_demo
from weights.models import Artifact, DownloadEvent, LinkUsage, RecipientCopy, Release
from weights.services import fingerprinting
from weights.services.fingerprinting import (
    NOT_LOCAL,
    FingerprintRefused,
    copies_prepare,
    copies_state,
    release_mark_fingerprinted,
)
from weights.services.original_cache import cache_path, cached_original
from weights.storage import LocalStorage, S3Storage, StorageError
from weights.tasks import delete_revoked_copies, issue_missing_links

pytestmark = pytest.mark.django_db(transaction=True)

SHARD = "consolidated.00.pth"
OWN = ("checklist.chk", "consolidated.00.pth", "consolidated.01.pth")


@pytest.fixture
def s3(s3_storage, settings, tmp_path) -> S3Storage:
    settings.WEIGHTS_FINGERPRINT_CACHE = tmp_path / "originals"
    return s3_storage


@pytest.fixture
def published(s3, releases, tmp_path) -> Release:
    return publish_demo(tmp_path)


@pytest.fixture
def release(published, settings) -> Release:
    settings.WEIGHTS_FINGERPRINT_MATERIALISE = True
    return release_mark_fingerprinted(release=published)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(s3: S3Storage, key: str) -> bytes:
    return s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def bucket_keys(s3: S3Storage, prefix: str = "") -> set[str]:
    listing = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return {obj["Key"] for obj in listing.get("Contents", [])}


def follow(url: str, range_header: str | None = None) -> tuple[int, bytes]:
    """A real HTTP GET of a presigned URL on the loopback S3 server."""
    request = urllib.request.Request(url)  # noqa: S310 - our loopback server
    if range_header:
        request.add_header("Range", range_header)
    with urllib.request.urlopen(request) as response:  # noqa: S310
        return response.status, response.read()


def test_without_the_option_a_release_in_s3_cannot_be_marked(published, settings):
    settings.WEIGHTS_FINGERPRINT_MATERIALISE = False
    with pytest.raises(FingerprintRefused) as refused:
        release_mark_fingerprinted(release=published)
    assert str(refused.value) == NOT_LOCAL.format(release=published)
    assert "WEIGHTS_FINGERPRINT_MATERIALISE=1" in str(refused.value)
    published.refresh_from_db()
    assert not published.fingerprinted and published.fingerprint_key is None
    # Refused before anything was downloaded to compute copies from.
    assert not Path(settings.WEIGHTS_FINGERPRINT_CACHE).exists()


def test_each_grantees_copy_is_in_the_bucket_and_the_link_redirects_to_it(
    client, s3, release, alice, bob, reviewer, make_submitted
):
    alice_token = approve(alice, make_submitted, reviewer, release)
    approve(bob, make_submitted, reviewer, release)
    shard = release.artifacts.get(path=SHARD)
    copies = {}
    for user in (alice, bob):
        grant = release.grants.get(user=user)
        rows = RecipientCopy.objects.filter(grant=grant, state="ready")
        assert sorted(c.artifact.path for c in rows) == list(OWN)
        for copy in rows:
            assert copy.storage_key == f"fingerprinted/{grant.pk}/original/{copy.artifact.path}"
            body = stored(s3, copy.storage_key)
            assert len(body) == copy.artifact.size
            assert (sha256(body), hashlib.md5(body).hexdigest()) == (copy.sha256, copy.md5)  # noqa: S324
        copies[user] = {c.artifact.path: c for c in rows}
    mine, bobs = copies[alice][SHARD], copies[bob][SHARD]
    alice_bytes = stored(s3, mine.storage_key)
    assert mine.sha256 != shard.sha256 and bobs.sha256 != mine.sha256
    # The uploaded bytes are the ones the portal computes on the fly, for any range.
    grant = mine.grant
    handle = fingerprinting.open_copy(grant, shard)
    try:
        assert handle.read() == alice_bytes
    finally:
        handle.close()
    checklist = stored(s3, copies[alice]["checklist.chk"].storage_key).decode()
    assert f"{mine.md5}  {SHARD}" in checklist and shard.md5 not in checklist

    # The link redirects to a presigned GET of the grantee's own object.
    response = client.get(f"/d/{alice_token}/{SHARD}")
    assert response.status_code == 302
    assert mine.storage_key in response["Location"] and "Signature=" in response["Location"]
    status, body = follow(response["Location"])
    assert status == 200 and body == alice_bytes
    event = DownloadEvent.objects.filter(artifact=shard).latest("pk")
    assert (event.outcome, event.status_code, event.bytes) == ("redirected", 302, shard.size)
    link = grant.download_links.get()
    usage = LinkUsage.objects.get(link=link, artifact=shard)
    assert usage.bytes_charged == shard.size

    # A Range request: the range is signed into the URL, charged, and served by S3.
    wanted = "bytes=4093-70001"
    response = client.get(f"/d/{alice_token}/{SHARD}", HTTP_RANGE=wanted)
    assert response.status_code == 302
    status, body = follow(response["Location"], wanted)
    assert status == 206 and body == alice_bytes[4093:70002]
    event = DownloadEvent.objects.filter(artifact=shard).latest("pk")
    assert (event.outcome, event.bytes, event.range_header) == ("redirected", 70002 - 4093, wanted)

    # What the grantee's tools check is their own copy's.
    assert client.head(f"/d/{alice_token}/{SHARD}")["ETag"] == f'"{mine.sha256}"'
    manifest = client.get(f"/d/{alice_token}/manifest.json").json()
    assert {f["path"]: f["sha256"] for f in manifest["files"]}[SHARD] == mine.sha256
    response = client.get(f"/d/{alice_token}/checklist.chk")
    assert follow(response["Location"])[1].decode() == checklist
    response = client.get(f"/d/{alice_token}/{SHARD}", HTTP_IF_NONE_MATCH=f'"{mine.sha256}"')
    assert response.status_code == 304
    # A file every grantee shares is the published object, as before.
    response = client.get(f"/d/{alice_token}/params.json")
    assert release.artifacts.get(path="params.json").storage_key in response["Location"]


def test_the_hub_door_redirects_to_the_grantees_copy(
    client, live_server, s3, release, alice, reviewer, make_submitted, tmp_path, monkeypatch
):
    approve(alice, make_submitted, reviewer, release)
    copy = RecipientCopy.objects.get(grant__user=alice, artifact__path=SHARD)
    token = token_create(user=alice, name="hf", second_factor=False).secret
    url = f"/research/llama-7b/resolve/{release.revision}/original/{SHARD}"
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}

    head = client.head(url, **auth)
    assert head.status_code == 200
    assert head["X-Linked-Etag"] == head["ETag"] == f'"{copy.sha256}"'
    response = client.get(url, **auth)
    assert response.status_code == 302 and copy.storage_key in response["Location"]
    assert response["X-Linked-Etag"] == f'"{copy.sha256}"'
    assert sha256(follow(response["Location"])[1]) == copy.sha256
    event = DownloadEvent.objects.filter(artifact=copy.artifact).latest("pk")
    assert (event.outcome, event.status_code) == ("redirected", 302)

    # The real client, through the portal's redirect to the bucket.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    path = hf_hub_download(
        "research/llama-7b",
        f"original/{SHARD}",
        endpoint=live_server.url,
        token=token,
        cache_dir=tmp_path / "hf",
    )
    assert sha256(Path(path).read_bytes()) == copy.sha256


def test_a_second_run_uploads_nothing_and_a_lost_object_is_written_again(
    s3, release, alice, reviewer, make_submitted, monkeypatch
):
    approve(alice, make_submitted, reviewer, release)
    grant = release.grants.get()
    before = {c.pk: (c.sha256, c.storage_key) for c in grant.recipient_copies.all()}
    uploads = []
    original_put = S3Storage.put_stream

    def counting(self, key, stream, *, size):
        uploads.append(key)
        return original_put(self, key, stream, size=size)

    monkeypatch.setattr(S3Storage, "put_stream", counting)

    assert copies_prepare(grant_id=grant.pk) == 0
    assert uploads == []
    lost = grant.recipient_copies.get(artifact__path=SHARD)
    s3.delete(lost.storage_key)
    assert copies_prepare(grant_id=grant.pk) == 1
    assert uploads == [lost.storage_key]
    assert sha256(stored(s3, lost.storage_key)) == lost.sha256
    assert {c.pk: (c.sha256, c.storage_key) for c in grant.recipient_copies.all()} == before


def test_the_link_is_emailed_only_once_the_copies_are_in_the_bucket(
    client, s3, release, alice, reviewer, make_submitted, monkeypatch
):
    def unreachable(self, key, stream, *, size):
        stream.read(1024)
        raise StorageError(f"cannot upload s3://{self.bucket}/{key}: bucket full")

    monkeypatch.setattr(S3Storage, "put_stream", unreachable)
    sent = len(mail.outbox)
    application = make_submitted(alice, slugs=("llama-7b",))
    reviews.application_approve(application=application, reviewer=reviewer, releases=[release])
    grant = release.grants.get()
    assert not [m for m in mail.outbox[sent:] if "download link" in m.subject]
    failed = RecipientCopy.objects.get(grant=grant)
    assert failed.state == "failed" and "bucket full" in failed.error
    assert "Preparing failed (0 of 3 files ready)" in copies_state(grant)
    assert bucket_keys(s3, "fingerprinted/") == set()

    monkeypatch.undo()
    issue_missing_links()  # the periodic sweep: the copy's task prepares, then emails
    [message] = [m for m in mail.outbox[sent:] if "download link" in m.subject]
    assert message.to == [alice.email]
    ready = RecipientCopy.objects.filter(grant=grant, state="ready")
    assert {c.storage_key for c in ready} == bucket_keys(s3, "fingerprinted/")
    assert len(ready) == 3


def test_a_revoked_grants_copies_are_deleted_from_the_bucket(
    s3, release, alice, bob, reviewer, make_submitted
):
    approve(alice, make_submitted, reviewer, release)
    approve(bob, make_submitted, reviewer, release)
    alices = release.grants.get(user=alice)
    bobs = set(RecipientCopy.objects.filter(grant__user=bob).values_list("storage_key", flat=True))
    kept = dict(alices.recipient_copies.values_list("artifact_id", "sha256"))

    reviews.grant_revoke(grant=alices, reviewer=reviewer, reason="Left the lab.")
    # The revocation asked for the deletion at once (eager here): her copies are gone.
    assert bucket_keys(s3, "fingerprinted/") == bobs
    # The record of what was sent stays; only the stored bytes go.
    assert dict(alices.recipient_copies.values_list("artifact_id", "sha256")) == kept
    assert set(alices.recipient_copies.values_list("storage_key", flat=True)) == {""}
    assert delete_revoked_copies.delay().get() == 0
    # The published files are never touched.
    for artifact in release.artifacts.all():
        assert s3.size_of(artifact.storage_key) == artifact.size


def test_originals_are_downloaded_once_verified_and_reused(s3, release, monkeypatch, settings):
    shard = release.artifacts.get(path=SHARD)
    path = fingerprinting.original_path(shard)  # downloaded when the release was marked
    assert path == cache_path(shard) and sha256(path.read_bytes()) == shard.sha256
    assert path.read_bytes() == (DEMO / SHARD).read_bytes()

    def no_download(self, key):
        raise AssertionError(f"downloaded {key} again")

    monkeypatch.setattr(S3Storage, "open", no_download)
    assert fingerprinting.original_path(shard) == path
    monkeypatch.undo()

    # An object that does not hold the published bytes is refused, and nothing is cached.
    key = f"sha256/00/{'0' * 64}"
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"x" * 100)
    wrong = Artifact(
        release=release, path="x.pth", size=100, sha256="0" * 64, md5="0" * 32, storage_key=key
    )
    with pytest.raises(StorageError, match="published as 100 bytes with 0000"):
        cached_original(wrong)
    cache = Path(settings.WEIGHTS_FINGERPRINT_CACHE)
    assert not cache_path(wrong).exists() and not list(cache.rglob("*.part"))


class _Chunks:
    """A stream that hands out at most `step` bytes a read, and counts how it was read."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos, self.reads = data, step, 0, 0

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        n = len(self.data) - self.pos if n < 0 else min(n, self.step)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk


def test_put_stream_uploads_in_parts_reading_the_stream_once(s3):
    data = bytes(range(256)) * (48 * 1024)  # 12 MiB: three parts at the 5 MiB minimum
    s3.multipart_threshold = 5 * 1024 * 1024
    stream = _Chunks(data, step=1 << 20)
    s3.put_stream("fingerprinted/1/original/a.pth", stream, size=len(data))
    assert stored(s3, "fingerprinted/1/original/a.pth") == data
    head = s3.client.head_object(Bucket=s3.bucket, Key="fingerprinted/1/original/a.pth")
    assert head["ETag"].endswith('-3"')  # a multipart upload's ETag
    assert stream.pos == len(data)

    with pytest.raises(StorageError, match="expected"):
        s3.put_stream("fingerprinted/1/original/b.pth", _Chunks(data, 1 << 20), size=len(data) + 1)
    assert s3.size_of("fingerprinted/1/original/b.pth") is None


def test_local_put_stream_writes_whole_files_only(tmp_path):
    storage = LocalStorage(tmp_path / "root")
    storage.put_stream("fingerprinted/1/a", _Chunks(b"abcdef", 2), size=6)
    assert (tmp_path / "root" / "fingerprinted" / "1" / "a").read_bytes() == b"abcdef"
    with pytest.raises(StorageError):
        storage.put_stream("fingerprinted/1/b", _Chunks(b"abc", 2), size=6)
    assert sorted(p.name for p in (tmp_path / "root" / "fingerprinted" / "1").iterdir()) == ["a"]


def test_with_local_storage_the_option_writes_copies_under_the_root_too(
    client, local_storage, settings, releases, alice, reviewer, make_submitted, tmp_path
):
    release = publish_demo(tmp_path)
    settings.WEIGHTS_FINGERPRINT_MATERIALISE = True
    release = release_mark_fingerprinted(release=release)
    token = approve(alice, make_submitted, reviewer, release)
    copy = RecipientCopy.objects.get(grant__user=alice, artifact__path=SHARD)
    written = local_storage.root / copy.storage_key
    assert sha256(written.read_bytes()) == copy.sha256

    response = client.get(f"/d/{token}/{SHARD}")
    assert response.status_code == 200 and response["ETag"] == f'"{copy.sha256}"'
    assert b"".join(response.streaming_content) == written.read_bytes()
    # Served from the written file, not computed: the computation is not even possible now.
    fingerprinting._layout.cache_clear()
    for artifact in release.artifacts.all():
        local_storage.delete(artifact.storage_key)
    response = client.get(f"/d/{token}/{SHARD}", HTTP_RANGE="bytes=10-19")
    assert b"".join(response.streaming_content) == written.read_bytes()[10:20]
