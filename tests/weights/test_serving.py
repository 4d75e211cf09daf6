"""The download endpoints under /d/<token>/: landing, manifest, download.sh and the files.

Assertions are on what a researcher and a reviewer see: status, headers, exact bytes,
LinkUsage.bytes_charged and DownloadEvent rows.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import subprocess
import threading
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.signals import request_finished
from django.db import close_old_connections, connection
from django.db.models import Sum
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from access.services import reviews
from access.services.licenses import license_publish
from tests.conftest import require_tools
from weights import serving
from weights.management.commands.generate_sample_release import MIB, write_sample_release
from weights.models import Artifact, DownloadEvent, DownloadLink, LinkUsage
from weights.refusals import NOT_FOUND
from weights.services import links
from weights.services.publishing import release_publish

pytestmark = pytest.mark.django_db

SHARD = "7B/consolidated.00.pth"
UA = "Wget/1.21.3"
CHUNK = 64 * 1024


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch, settings):
    """1 MiB shards stream in 16 chunks, so a cut mid-file is a real cut. No slack and no
    free re-requests here, so that every byte sent is a byte charged (the rule for
    re-requests has its own tests in test_budget_rule.py)."""
    monkeypatch.setattr(serving, "CHUNK_SIZE", CHUNK)
    settings.WEIGHTS_BUDGET_SLACK_BYTES = 0
    settings.WEIGHTS_RESUME_WINDOW_SECONDS = 0


def publish(tmp_path: Path, slug: str, size_label: str, seed: int) -> Path:
    source = tmp_path / "src" / slug
    write_sample_release(source, size_label=size_label, shards=2, shard_bytes=MIB, seed=seed)
    release_publish(directory=source, slug=slug)
    return source


@pytest.fixture
def source(local_storage, releases, tmp_path) -> Path:
    """llama-7b and llama-13b published to local storage; returns the 7B source directory."""
    publish(tmp_path, "llama-13b", "13B", seed=2)
    return publish(tmp_path, "llama-7b", "7B", seed=1)


@pytest.fixture
def grant(alice, reviewer, make_submitted, releases):
    application = make_submitted(alice, slugs=("llama-7b", "llama-13b"))
    [grant] = reviews.application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    return grant


@pytest.fixture
def token(source, grant) -> str:
    return links.link_issue(grant=grant, budget_copies=2).token


@pytest.fixture
def link(token) -> DownloadLink:
    return DownloadLink.objects.get()


def file_url(token: str, path: str = SHARD) -> str:
    return f"/d/{token}/{path}"


def get(client, url, **headers):
    return client.get(url, HTTP_USER_AGENT=UA, **headers)


def body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def artifact(path: str = SHARD, slug: str = "llama-7b") -> Artifact:
    return Artifact.objects.get(release__slug=slug, path=path)


def charged(path: str = SHARD) -> int:
    """Bytes charged for the file, over every link (a test's grant may have had several)."""
    total = LinkUsage.objects.filter(artifact=artifact(path)).aggregate(n=Sum("bytes_charged"))
    return total["n"] or 0


def hang_up(response) -> None:
    """What a WSGI server does when the client goes away: stop iterating, close the response.

    The test client wraps the stream in a generator that closes the response when it ends
    (holding back close_old_connections, which would end the test's transaction); end it
    early. A stream never started is closed directly, the same way."""
    wrapper = response._iterator
    if inspect.getgeneratorstate(wrapper) == inspect.GEN_SUSPENDED:
        wrapper.close()
        return
    request_finished.disconnect(close_old_connections)
    try:
        response.close()
    finally:
        request_finished.connect(close_old_connections)


def read_until_stopped(chunks) -> int:
    """The rest of a stream the portal stops: the server is told to drop the connection
    (so that the client sees a short body at once), after the event is recorded."""
    received = 0
    with pytest.raises(serving.StreamStopped):
        for chunk in chunks:
            received += len(chunk)
    return received


def assert_download_headers(response, *, cache="private, no-store"):
    assert response["Referrer-Policy"] == "no-referrer"
    assert response["Cache-Control"] == cache
    assert "noindex" in response["X-Robots-Tag"]


def assert_refusal(response, status, code, token, *, as_json=False):
    assert response.status_code == status
    assert_download_headers(response)
    text = response.content.decode()
    assert token not in text and "/d/" not in text  # the URL (and its token) is never echoed
    if as_json:
        assert response["Content-Type"] == "application/json"
        data = response.json()
        assert data["error"] == code and data["detail"]
        return data
    assert response["Content-Type"].startswith("text/html")
    return text


# --- whole files and ranges --------------------------------------------------------------


def test_full_download_is_the_exact_file_and_charges_its_size(client, token, source, link):
    data = (source / SHARD).read_bytes()
    response = get(client, file_url(token), REMOTE_ADDR="203.0.113.9")

    assert response.status_code == 200 and response.streaming
    assert body(response) == data
    assert response["Content-Length"] == str(len(data)) == str(MIB)
    assert response["Accept-Ranges"] == "bytes"
    assert response["ETag"] == f'"{artifact().sha256}"'
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"] == 'attachment; filename="consolidated.00.pth"'
    assert_download_headers(response, cache="private")
    assert charged() == MIB

    event = DownloadEvent.objects.get()
    assert (event.link, event.user, event.artifact) == (link, link.grant.user, artifact())
    assert (event.ip_address, event.user_agent, event.range_header) == ("203.0.113.9", UA, "")
    assert (event.bytes, event.status_code, event.outcome) == (MIB, 200, "served")


def test_single_range_is_206_with_the_exact_slice(client, token, source):
    data = (source / SHARD).read_bytes()
    response = get(client, file_url(token), HTTP_RANGE="bytes=1000-1999")

    assert response.status_code == 206
    assert body(response) == data[1000:2000]
    assert response["Content-Range"] == f"bytes 1000-1999/{MIB}"
    assert response["Content-Length"] == "1000"
    assert charged() == 1000
    event = DownloadEvent.objects.get()
    assert (event.range_header, event.bytes, event.status_code) == ("bytes=1000-1999", 1000, 206)


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=-100", MIB - 100, MIB - 1),  # suffix
        (f"bytes={MIB - 300}-", MIB - 300, MIB - 1),  # open
        (f"bytes={MIB - 10}-{MIB * 5}", MIB - 10, MIB - 1),  # end past EOF is clamped
        ("bytes=-9999999999", 0, MIB - 1),  # suffix longer than the file
    ],
)
def test_suffix_and_open_ranges(client, token, source, header, start, end):
    data = (source / SHARD).read_bytes()
    response = get(client, file_url(token), HTTP_RANGE=header)
    assert response.status_code == 206
    assert body(response) == data[start : end + 1]
    assert response["Content-Range"] == f"bytes {start}-{end}/{MIB}"
    assert charged() == end - start + 1


@pytest.mark.parametrize("header", [f"bytes={MIB}-", f"bytes={MIB + 5}-{MIB + 9}", "bytes=-0"])
def test_unsatisfiable_range_is_416_and_free(client, token, header):
    response = get(client, file_url(token), HTTP_RANGE=header)
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{MIB}"
    assert token not in response.content.decode()
    assert charged() == 0
    event = DownloadEvent.objects.get()
    assert (event.outcome, event.status_code, event.bytes) == ("bad_range", 416, 0)


@pytest.mark.parametrize(
    "header", ["bytes=oops", "bytes=10-5", "lines=1-2", "bytes=0-1,5-9", "bytes=1_0-20"]
)
def test_malformed_or_multiple_ranges_serve_the_whole_file(client, token, source, header):
    response = get(client, file_url(token), HTTP_RANGE=header)
    assert response.status_code == 200
    assert "Content-Range" not in response
    assert body(response) == (source / SHARD).read_bytes()
    assert charged() == MIB


def test_if_range_match_is_206_and_mismatch_is_the_whole_file(client, token, source):
    data = (source / SHARD).read_bytes()
    etag = f'"{artifact().sha256}"'
    same = get(client, file_url(token), HTTP_RANGE="bytes=10-19", HTTP_IF_RANGE=etag)
    assert same.status_code == 206 and body(same) == data[10:20]

    weak = get(client, file_url(token), HTTP_RANGE="bytes=10-19", HTTP_IF_RANGE="W/" + etag)
    assert weak.status_code == 200 and weak["Content-Length"] == str(MIB)
    hang_up(weak)  # not read: refunded
    changed = get(client, file_url(token), HTTP_RANGE="bytes=10-19", HTTP_IF_RANGE='"0000"')
    assert changed.status_code == 200 and body(changed) == data
    assert charged() == 10 + MIB


def test_if_none_match_is_304_and_free(client, token):
    response = get(client, file_url(token), HTTP_IF_NONE_MATCH=f'"{artifact().sha256}"')
    assert response.status_code == 304 and response.content == b""
    assert charged() == 0
    assert DownloadEvent.objects.get().outcome == "not_modified"


def test_head_sends_the_headers_and_charges_nothing(client, token):
    response = client.head(file_url(token), HTTP_RANGE="bytes=0-9")
    assert response.status_code == 200  # Range does not apply to HEAD
    assert response.content == b""
    assert response["Content-Length"] == str(MIB)
    assert response["ETag"] == f'"{artifact().sha256}"'
    assert response["Accept-Ranges"] == "bytes"
    assert charged() == 0
    event = DownloadEvent.objects.get()
    assert (event.bytes, event.status_code) == (0, 200)


def test_other_methods_are_refused_without_logging_the_token(client, token, caplog):
    with caplog.at_level(logging.DEBUG):
        response = client.post(file_url(token))
    assert response.status_code == 405 and response["Allow"] == "GET, HEAD"
    assert_download_headers(response)
    assert token not in caplog.text


# --- budget accounting -------------------------------------------------------------------


def test_two_copies_then_429_and_a_resume_does_not_count_the_first_half_twice(
    client, token, source
):
    data = (source / SHARD).read_bytes()
    assert body(get(client, file_url(token))) == data
    assert charged() == MIB

    # The second copy is cut at half: only the bytes the client got are charged.
    cut = get(client, file_url(token))
    chunks = iter(cut.streaming_content)
    received = b"".join(next(chunks) for _ in range(9))  # 8 chunks confirmed, the 9th in flight
    hang_up(cut)
    half = 8 * CHUNK
    assert charged() == MIB + half
    assert data.startswith(received[:half])
    partial = DownloadEvent.objects.order_by("pk").last()
    assert (partial.outcome, partial.bytes, partial.status_code) == ("partial", half, 200)

    # wget --continue asks for the rest; together they make exactly two copies.
    rest = get(client, file_url(token), HTTP_RANGE=f"bytes={half}-")
    assert rest.status_code == 206 and body(rest) == data[half:]
    assert charged() == 2 * MIB

    third = get(client, file_url(token))
    text = assert_refusal(third, 429, "budget", token)
    assert "budget" in text and reverse("weights:my_downloads") in text
    assert charged() == 2 * MIB
    event = DownloadEvent.objects.order_by("pk").last()
    assert (event.outcome, event.status_code, event.bytes) == ("budget", 429, 0)
    # Other files keep their own budget.
    assert get(client, file_url(token, "7B/params.json")).status_code == 200


def test_sixteen_range_requests_cost_exactly_one_copy(client, token, source):
    data = (source / SHARD).read_bytes()
    step = MIB // 16
    parts = []
    for i in range(16):
        response = get(client, file_url(token), HTTP_RANGE=f"bytes={i * step}-{(i + 1) * step - 1}")
        assert response.status_code == 206
        parts.append(body(response))
    assert b"".join(parts) == data
    assert charged() == MIB
    assert DownloadEvent.objects.filter(outcome="served", status_code=206).count() == 16


@pytest.mark.django_db(transaction=True)
def test_parallel_range_requests_from_threads_cost_exactly_one_copy(token, source):
    """aria2c -x16: sixteen connections at once, each a range; the budget charges bytes."""
    from django.test import Client

    data = (source / SHARD).read_bytes()
    step = MIB // 16
    parts: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def fetch(i: int) -> None:
        try:
            response = Client().get(
                file_url(token), HTTP_RANGE=f"bytes={i * step}-{(i + 1) * step - 1}"
            )
            assert response.status_code == 206, response.status_code
            parts[i] = body(response)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()  # this thread's own connection

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert b"".join(parts[i] for i in range(16)) == data
    assert charged() == MIB


def test_a_client_that_goes_away_is_refunded_the_unsent_bytes(client, token):
    response = get(client, file_url(token), HTTP_RANGE="bytes=100-")
    assert charged() == MIB - 100  # reserved up front, so parallel requests cannot overdraw
    next(iter(response.streaming_content))  # one chunk handed to the server, never confirmed
    hang_up(response)
    assert charged() == 0
    event = DownloadEvent.objects.get()
    assert (event.outcome, event.bytes, event.status_code) == ("partial", 0, 206)


def test_a_stream_closed_before_it_started_is_refunded_in_full(client, token):
    hang_up(get(client, file_url(token)))
    assert charged() == 0
    assert DownloadEvent.objects.get().outcome == "partial"


def test_budget_is_checked_against_the_requested_range(client, token, link):
    LinkUsage.objects.filter(link=link, artifact=artifact()).update(bytes_charged=2 * MIB - 10)
    assert get(client, file_url(token), HTTP_RANGE="bytes=0-10").status_code == 429
    response = get(client, file_url(token), HTTP_RANGE="bytes=0-9")
    assert response.status_code == 206 and len(body(response)) == 10
    assert charged() == 2 * MIB


# --- revocation while a file streams -----------------------------------------------------


def _revoke_link(*, link, grant, reviewer) -> None:
    links.link_revoke(link=link, actor=reviewer, reason="Posted on a forum.")


def _revoke_grant(*, link, grant, reviewer) -> None:
    reviews.grant_revoke(grant=grant, reviewer=reviewer, reason="Terms breached.")


def _supersede_license(*, link, grant, reviewer) -> None:
    license_publish(name="LLaMA license", version="2", text="Version 2 of the license.")


@pytest.mark.parametrize(
    ("stop", "outcome"),
    [(_revoke_link, "revoked"), (_revoke_grant, "revoked"), (_supersede_license, "license")],
)
def test_revocation_stops_a_running_stream_within_the_byte_threshold(
    client, token, link, grant, reviewer, monkeypatch, stop, outcome
):
    monkeypatch.setattr(serving, "RECHECK_BYTES", 2 * CHUNK, raising=False)
    monkeypatch.setattr(serving, "RECHECK_SECONDS", 3600.0, raising=False)
    response = get(client, file_url(token))
    chunks = iter(response.streaming_content)
    received = len(next(chunks))
    stop(link=link, grant=grant, reviewer=reviewer)
    received += read_until_stopped(chunks)
    assert received == 2 * CHUNK  # the chunk after the revocation, then the re-check stopped it
    assert charged() == 2 * CHUNK  # the other 14 chunks were refunded
    event = DownloadEvent.objects.get()
    assert (event.outcome, event.bytes, event.status_code) == (outcome, 2 * CHUNK, 200)


def test_revocation_stops_a_running_stream_after_a_few_seconds(
    client, token, link, reviewer, monkeypatch
):
    clock = [1000.0]
    monkeypatch.setattr(serving, "_monotonic", lambda: clock[0], raising=False)
    monkeypatch.setattr(serving, "RECHECK_BYTES", 100 * MIB, raising=False)
    response = get(client, file_url(token), HTTP_RANGE="bytes=100-")
    chunks = iter(response.streaming_content)
    received = len(next(chunks))
    links.link_revoke(link=link, actor=reviewer, reason="Posted on a forum.")
    received += len(next(chunks))  # no time has passed: no re-check yet
    clock[0] += 5.0  # RECHECK_SECONDS
    received += read_until_stopped(chunks)
    assert received == 2 * CHUNK
    assert charged() == 2 * CHUNK
    event = DownloadEvent.objects.get()
    assert (event.outcome, event.bytes, event.status_code) == ("revoked", 2 * CHUNK, 206)


# --- landing page, manifest, download.sh -------------------------------------------------


def test_landing_page_lists_the_release_and_charges_nothing(client, token, source):
    response = client.get(f"/d/{token}/")
    assert response.status_code == 200
    assert_download_headers(response)
    text = response.content.decode()
    landing = f"http://testserver/d/{token}/"
    assert f"python -m weights.download &quot;{landing}&quot;" in text
    assert f'href="/d/{token}/download.sh"' in text
    assert f'href="/d/{token}/manifest.json"' in text
    for item in Artifact.objects.filter(release__slug="llama-7b"):
        assert item.path in text and item.sha256 in text and str(item.size) in text
    assert filesizeformat(MIB) in text  # human-readable size
    assert str(2 * MIB) in text  # the budget left per file, in bytes
    assert "13B/" not in text  # another release's files
    assert client.head(f"/d/{token}/").status_code == 200
    assert not LinkUsage.objects.exclude(bytes_charged=0).exists()
    assert not DownloadEvent.objects.exists()


def test_manifest_has_the_shape_the_cli_reads_and_charges_nothing(client, token, link):
    body(get(client, file_url(token), HTTP_RANGE="bytes=0-99"))
    response = client.get(f"/d/{token}/manifest.json")
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    assert_download_headers(response)
    data = response.json()
    assert set(data) == {"release", "name", "expires_at", "budget_copies", "files"}
    assert data["release"] == "llama-7b" and data["name"] == "LLaMA 7B"
    assert data["budget_copies"] == 2
    assert data["expires_at"] == link.expires_at.isoformat()
    expected = {a.path: a for a in Artifact.objects.filter(release__slug="llama-7b")}
    assert [f["path"] for f in data["files"]] == sorted(expected)
    for entry in data["files"]:
        item = expected[entry["path"]]
        assert set(entry) == {"path", "size", "sha256", "md5", "url", "remaining_bytes"}
        assert (entry["size"], entry["sha256"], entry["md5"]) == (item.size, item.sha256, item.md5)
        assert entry["url"] == f"http://testserver/d/{token}/{item.path}"
        spent = 100 if item.path == SHARD else 0
        assert entry["remaining_bytes"] == 2 * item.size - spent
    assert charged() == 100 and DownloadEvent.objects.count() == 1


def test_manifest_refusals_are_json(client, token, link):
    links.link_revoke(link=link, actor=None, reason="test")
    data = assert_refusal(
        client.get(f"/d/{token}/manifest.json"), 403, "revoked", token, as_json=True
    )
    assert data["action_url"] == "http://testserver" + reverse("weights:my_downloads")


def test_download_script_is_posix_and_uses_the_star_idiom(client, token):
    response = client.get(f"/d/{token}/download.sh")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/x-shellscript"
    assert_download_headers(response)
    script = response.content.decode()
    assert script.startswith("#!/bin/sh\n")
    assert f"PRESIGNED_URL='http://testserver/d/{token}/*'" in script
    assert "wget --continue" in script and "curl" in script and "-C -" in script
    assert "md5sum -c" in script and "sha256sum -c" in script
    assert f"{artifact().sha256}  ./{SHARD}" in script
    assert "&quot;" not in script and "&#x27;" not in script  # no HTML escaping in a script
    for shell in ("sh", "dash", "bash"):
        if shutil.which(shell):
            check = subprocess.run([shell, "-n"], input=script, text=True, capture_output=True)
            assert check.returncode == 0, (shell, check.stderr)
    assert charged() == 0


def _tool_dir(tmp_path: Path, without: str) -> Path:
    """A PATH with the usual tools but not `without` (to exercise the other downloader)."""
    bin_dir = tmp_path / f"bin-no-{without}"
    bin_dir.mkdir()
    for tool in (
        "sh",
        "wget",
        "curl",
        "mkdir",
        "dirname",
        "basename",
        "cat",
        "md5sum",
        "sha256sum",
        "wc",
        "rm",
        "sed",
    ):
        found = shutil.which(tool)
        if tool != without and found:
            (bin_dir / tool).symlink_to(found)
    return bin_dir


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("without", ["curl", "wget"])
def test_download_script_fetches_resumes_and_verifies_everything(
    live_server, tmp_path, alice, reviewer, make_submitted, releases, settings, without
):
    """The classic script against a running portal: `*` replaced by each path, resume, checks."""
    other = "wget" if without == "curl" else "curl"
    require_tools(other, "md5sum")
    from weights.storage import reset_storage

    settings.WEIGHTS_STORAGE = "local"
    settings.WEIGHTS_LOCAL_ROOT = tmp_path / "store"
    reset_storage()
    source = publish(tmp_path, "llama-7b", "7B", seed=1)
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = reviews.application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    token = links.link_issue(grant=grant, budget_copies=2).token
    with urllib.request.urlopen(f"{live_server.url}/d/{token}/download.sh") as response:  # noqa: S310
        script = response.read()
    dest = tmp_path / "out"
    (dest / "7B").mkdir(parents=True)
    (dest / SHARD).write_bytes((source / SHARD).read_bytes()[: MIB // 2])  # an earlier cut
    (tmp_path / "download.sh").write_bytes(script)
    env = {**os.environ, "PATH": str(_tool_dir(tmp_path, without)), "NO_PROXY": "127.0.0.1"}
    run = subprocess.run(
        ["sh", str(tmp_path / "download.sh"), str(dest)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for path in Artifact.objects.filter(release__slug="llama-7b").values_list("path", flat=True):
        assert (dest / path).read_bytes() == (source / path).read_bytes()
    assert charged() == MIB // 2  # the resume fetched only the missing half

    (dest / "7B" / "params.json").write_text("{}")  # corrupt a file: the checks must fail
    (dest / "7B" / "checklist.chk").unlink()
    again = subprocess.run(
        ["sh", str(tmp_path / "download.sh"), str(dest)], env=env, capture_output=True, text=True
    )
    assert again.returncode != 0


# --- refusals ----------------------------------------------------------------------------


def test_expired_link_is_410_with_the_fresh_link_hint(client, token, link, monkeypatch):
    monkeypatch.setattr(links, "_now", lambda: link.expires_at + timedelta(seconds=1))
    text = assert_refusal(get(client, file_url(token)), 410, "expired", token)
    assert reverse("weights:my_downloads") in text and "fresh link" in text
    assert assert_refusal(client.get(f"/d/{token}/"), 410, "expired", token)
    data = assert_refusal(
        get(client, file_url(token), HTTP_ACCEPT="application/json"),
        410,
        "expired",
        token,
        as_json=True,
    )
    assert data["action_url"] == "http://testserver" + reverse("weights:my_downloads")
    assert charged() == 0
    assert (
        list(DownloadEvent.objects.values_list("outcome", "status_code", "link"))
        == [("expired", 410, link.pk)] * 2
    )


def test_expiry_stored_in_the_past_is_410(client, token, link):
    DownloadLink.objects.filter(pk=link.pk).update(expires_at=timezone.now() - timedelta(hours=1))
    assert_refusal(get(client, file_url(token)), 410, "expired", token)


def test_revoked_link_is_403(client, token, link):
    links.link_revoke(link=link, actor=None, reason="Shared on a forum.")
    assert_refusal(get(client, file_url(token)), 403, "revoked", token)
    assert DownloadEvent.objects.get().outcome == "revoked"


def test_revoked_grant_is_403(client, token, grant, reviewer):
    reviews.grant_revoke(grant=grant, reviewer=reviewer, reason="Terms breached.")
    text = assert_refusal(get(client, file_url(token)), 403, "revoked", token)
    assert "revoked" in text
    assert charged() == 0


def test_superseded_license_is_403_with_the_accept_page(client, token):
    license_publish(name="LLaMA license", version="2", text="Version 2 of the license.")
    accept = reverse("access:license_accept")
    text = assert_refusal(get(client, file_url(token)), 403, "license", token)
    assert f'href="http://testserver{accept}"' in text
    data = assert_refusal(
        get(client, file_url(token), HTTP_ACCEPT="application/json"),
        403,
        "license",
        token,
        as_json=True,
    )
    assert data["action_url"] == "http://testserver" + accept
    assert DownloadEvent.objects.filter(outcome="license").count() == 2


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],  # truncated
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # tampered
        lambda t: t + "x",
        lambda t: t.upper(),
        lambda t: "not-a-token",
    ],
)
def test_tampered_and_truncated_tokens_are_404(client, token, mangle, caplog):
    bad = mangle(token)
    with caplog.at_level(logging.DEBUG):
        text = assert_refusal(get(client, file_url(bad)), 404, "invalid", bad)
        assert_refusal(client.get(f"/d/{bad}/"), 404, "invalid", bad)
    assert "not valid" in text
    assert bad not in caplog.text and token not in caplog.text  # nor in the logs
    event = DownloadEvent.objects.get()
    assert (event.outcome, event.link, event.user, event.status_code) == (
        "invalid",
        None,
        None,
        404,
    )


def test_a_token_is_a_bearer_token_for_its_own_grant_only(
    client, token, bob, charlie, reviewer, make_submitted, releases, alice
):
    application = make_submitted(bob, slugs=("llama-13b",))
    [bob_grant] = reviews.application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-13b"]]
    )
    bob_token = links.link_issue(grant=bob_grant).token
    # Bob's link covers 13B only: the 7B shard is "no such file" for it.
    assert get(client, file_url(bob_token, SHARD)).status_code == 404
    assert get(client, file_url(bob_token, "13B/consolidated.00.pth")).status_code == 200
    # Charlie, signed in, with Alice's token: served and accounted to Alice's grant.
    client.force_login(charlie)
    served = get(client, file_url(token, "7B/params.json"))
    assert served.status_code == 200 and body(served)
    assert DownloadEvent.objects.order_by("pk").last().user == alice
    assert not DownloadLink.objects.filter(grant__user=charlie).exists()


def test_another_releases_file_is_404(client, token):
    assert artifact("13B/consolidated.00.pth", "llama-13b")  # it exists, in llama-13b
    response = get(client, file_url(token, "13B/consolidated.00.pth"))
    assert_refusal(response, 404, "not_found", token)
    assert get(client, file_url(token, "tokenizer.model")).status_code == 200  # 7B's own copy


@pytest.mark.parametrize(
    "raw",
    [
        "..%2f..%2fsecret.txt",
        "%2e%2e/%2e%2e/secret.txt",
        "7B/../../secret.txt",
        "7B/%2e%2e%2f%2e%2e%2f..%2fsecret.txt",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "..%5c..%5csecret.txt",
        "7B\\params.json",
        "7B/params.json%00",
        "7B/params.json%00.txt",
        "7B//params.json",
        "./7B/params.json",
        "7B/./params.json",
        "7B/params.json/",
    ],
)
def test_path_traversal_is_404_and_reads_nothing(client, token, link, raw, tmp_path, monkeypatch):
    (tmp_path / "secret.txt").write_text("TOP SECRET")  # beside the storage root
    looked_up = []
    monkeypatch.setattr(serving, "get_storage", lambda: looked_up.append(1))
    response = get(client, f"/d/{token}/{raw}")
    text = assert_refusal(response, 404, "not_found", token)
    assert escape(NOT_FOUND) in text and "TOP SECRET" not in text and "root:" not in text
    assert looked_up == []  # storage was never consulted
    no_such_file = get(client, file_url(token, "7B/nope.pth"))
    assert no_such_file.content == response.content  # indistinguishable from a missing file
    assert charged("7B/params.json") == 0
    assert DownloadEvent.objects.filter(outcome="not_found", link=link).count() == 2


def test_a_newline_in_the_path_is_404_too(client, token, tmp_path, monkeypatch):
    # weights/urls.py's `.+` stops at a newline, so the URL resolver answers this one.
    monkeypatch.setattr(serving, "get_storage", lambda: pytest.fail("storage consulted"))
    response = get(client, f"/d/{token}/7B/params.json%0a")
    assert response.status_code == 404 and token not in response.content.decode()
    assert charged("7B/params.json") == 0


def test_json_refusal_when_asked(client, token):
    response = get(client, file_url(token, "nope"), HTTP_ACCEPT="application/json, */*;q=0.1")
    data = assert_refusal(response, 404, "not_found", token, as_json=True)
    assert data == {"error": "not_found", "detail": NOT_FOUND, "action_url": None}
    html = get(client, file_url(token, "nope"), HTTP_ACCEPT="text/html,*/*;q=0.8")
    assert html["Content-Type"].startswith("text/html")


def test_missing_bytes_in_storage_are_503_and_free(client, token, local_storage):
    local_storage.delete(artifact().storage_key)
    assert_refusal(get(client, file_url(token)), 503, "unavailable", token)
    assert charged() == 0


# --- events and flags --------------------------------------------------------------------


def test_every_request_is_an_event_and_many_addresses_flag_the_link(client, token, link, settings):
    settings.WEIGHTS_LINK_MAX_IPS = 2
    for i, address in enumerate(["192.0.2.1", "192.0.2.2", "192.0.2.1"]):
        body(get(client, file_url(token), REMOTE_ADDR=address, HTTP_RANGE=f"bytes={i}-{i}"))
    link.refresh_from_db()
    assert link.flagged_at is None
    body(get(client, file_url(token), REMOTE_ADDR="2001:db8::7", HTTP_RANGE="bytes=9-9"))
    link.refresh_from_db()
    assert link.flagged_at is not None
    rows = list(
        DownloadEvent.objects.order_by("pk").values_list("ip_address", "range_header", "bytes")
    )
    assert rows == [
        ("192.0.2.1", "bytes=0-0", 1),
        ("192.0.2.2", "bytes=1-1", 1),
        ("192.0.2.1", "bytes=2-2", 1),
        ("2001:db8::7", "bytes=9-9", 1),
    ]


# --- X-Accel-Redirect and S3 -------------------------------------------------------------


def test_x_accel_mode_hands_the_file_to_nginx_and_charges_the_authorised_range(
    client, token, settings
):
    settings.WEIGHTS_X_ACCEL_PREFIX = "/_weights/"
    key = artifact().storage_key
    response = get(client, file_url(token))
    assert response.status_code == 200 and response.content == b""
    assert response["X-Accel-Redirect"] == f"/_weights/{key}"
    assert response["ETag"] == f'"{artifact().sha256}"'
    assert_download_headers(response, cache="private")
    assert charged() == MIB

    # Another address (the same one would re-request bytes it was charged for: free).
    ranged = get(client, file_url(token), HTTP_RANGE="bytes=0-99", REMOTE_ADDR="203.0.113.9")
    assert ranged["X-Accel-Redirect"] == f"/_weights/{key}" and ranged.content == b""
    assert charged() == MIB + 100
    assert list(DownloadEvent.objects.order_by("pk").values_list("bytes", "status_code")) == [
        (MIB, 200),
        (100, 206),
    ]


def test_x_accel_with_if_range_charges_the_whole_file(client, token, settings):
    """nginx compares If-Range with its own ETag and then sends everything: charge that."""
    settings.WEIGHTS_X_ACCEL_PREFIX = "/_weights/"
    etag = f'"{artifact().sha256}"'
    response = get(client, file_url(token), HTTP_RANGE="bytes=0-99", HTTP_IF_RANGE=etag)
    assert response.status_code == 200 and response["X-Accel-Redirect"]
    assert charged() == MIB


def _fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
        return response.status, response.read()


@pytest.fixture
def s3_token(s3_storage, releases, grant, tmp_path) -> tuple[str, Path]:
    source = publish(tmp_path, "llama-7b", "7B", seed=1)
    return links.link_issue(grant=grant, budget_copies=2).token, source


def test_s3_redirects_to_a_fresh_presigned_url_with_the_right_bytes(client, s3_token, settings):
    token, source = s3_token
    data = (source / SHARD).read_bytes()
    response = get(client, file_url(token))
    assert response.status_code == 302
    assert_download_headers(response)
    location = response["Location"]
    assert f"X-Amz-Expires={settings.WEIGHTS_PRESIGN_SECONDS}" in location
    assert _fetch(location) == (200, data)
    assert charged() == MIB
    event = DownloadEvent.objects.get()
    assert (event.outcome, event.status_code, event.bytes) == ("redirected", 302, MIB)


def test_s3_range_is_charged_as_authorised_and_signed_into_the_url(client, s3_token):
    token, source = s3_token
    data = (source / SHARD).read_bytes()
    response = get(client, file_url(token), HTTP_RANGE="bytes=-100")
    assert response.status_code == 302
    location = response["Location"]
    assert "range" in location.lower()  # signed in: the client must repeat exactly this Range
    status, part = _fetch(location, {"Range": "bytes=-100"})  # as curl/wget resend it
    assert (status, part) == (206, data[-100:])
    assert charged() == 100
    assert client.head(file_url(token)).status_code == 200  # HEAD: no redirect, no charge
    assert charged() == 100


def test_s3_budget_spent_is_429_without_a_redirect(client, s3_token):
    token, _ = s3_token
    LinkUsage.objects.filter(link=DownloadLink.objects.get(), artifact=artifact()).update(
        bytes_charged=2 * MIB
    )
    response = get(client, file_url(token))
    assert_refusal(response, 429, "budget", token)
    assert "Location" not in response


def test_s3_down_refuses_with_503_and_charges_nothing(client, s3_token, settings):
    """Found by make prove: presigning is local, so the portal must ask storage first."""
    from tests.servers import free_port

    token, _ = s3_token
    settings.WEIGHTS_S3_ENDPOINT_URL = f"http://127.0.0.1:{free_port()}"  # the bucket went away
    response = get(client, file_url(token))
    assert response.status_code == 503
    assert "Location" not in response
    assert charged() == 0
    assert DownloadEvent.objects.get().status_code == 503
