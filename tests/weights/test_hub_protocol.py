"""The Hugging Face Hub door, with the real `huggingface_hub` client against a real gunicorn.

`snapshot_download`, `hf_hub_download` and the `hf download` CLI fetch a granted release
with a portal API token as the HF token; a second snapshot makes no file request; the
errors the client raises (GatedRepoError with the portal's message, RepositoryNotFound,
RevisionNotFound, EntryNotFound, a bad token) and the budget and audit rows are those of a
/d/<token>/ link. Local streaming and S3 (a 302 to a presigned GET) are both served.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from requests import HTTPError

from access.services.reviews import application_approve, grant_revoke
from access.tokens import token_create
from tests.servers import SERVER_SECRET_KEY, portal_gunicorn, process_env
from tests.weights.clients import eventually
from tests.weights.conftest import ServerStorage, server_storage, share_storage
from weights.management.commands.generate_sample_release import MIB, write_sample_release
from weights.models import Artifact, DownloadEvent, LinkUsage, Release
from weights.services.publishing import release_publish
from weights.storage import reset_storage

pytestmark = pytest.mark.django_db(transaction=True)

SLUG = "llama-7b"
EMBEDDED_CACHE_TABLE = "portal_cache"


@dataclass(frozen=True)
class Portal:
    url: str
    storage: ServerStorage


@pytest.fixture(scope="module", params=("local", "s3"))
def portal(request, django_db_setup, tmp_path_factory) -> Iterator[Portal]:
    tmp = tmp_path_factory.mktemp(f"hub-{request.param}")
    with contextlib.ExitStack() as stack:
        storage = stack.enter_context(server_storage(request, tmp, request.param))
        port, _log = stack.enter_context(portal_gunicorn(tmp, storage.env))
        yield Portal(url=f"http://127.0.0.1:{port}", storage=storage)


@pytest.fixture(autouse=True)
def _same_storage(portal, settings, monkeypatch, tmp_path):
    settings.SECRET_KEY = SERVER_SECRET_KEY  # tokens are stamped with it
    share_storage(portal.storage, settings, monkeypatch)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield
    _server_done()
    reset_storage()


def _server_done(quiet_s: float = 0.3, timeout_s: float = 5.0) -> None:
    """Wait until the server has closed its last stream: a stream settles its charge and
    writes its event just after the client has its last byte, and the test database must
    not be flushed under it (PostgreSQL: TRUNCATE deadlocks against that UPDATE)."""
    deadline = time.monotonic() + timeout_s
    seen, since = DownloadEvent.objects.count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = DownloadEvent.objects.count()
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


@pytest.fixture
def release(tmp_path) -> Release:
    source = tmp_path / "release"
    write_sample_release(source, size_label="7B", shards=2, shard_bytes=MIB, seed=3)
    return release_publish(directory=source, slug=SLUG).release


@pytest.fixture
def granted(release, alice, reviewer, make_submitted, releases):
    application = make_submitted(alice, slugs=(SLUG,))
    [grant] = application_approve(
        application=application, reviewer=reviewer, releases=[releases[SLUG]]
    )
    return grant


@pytest.fixture
def token(alice) -> str:
    return token_create(user=alice, name="hf", second_factor=False).secret


def repo() -> str:
    return f"{settings.WEIGHTS_HUB_NAMESPACE}/{SLUG}"


def file_events() -> int:
    return DownloadEvent.objects.count()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_snapshot_download_gets_every_file_and_a_second_one_requests_none(
    portal, granted, token, tmp_path
):
    cache = tmp_path / "cache"
    folder = Path(snapshot_download(repo(), endpoint=portal.url, token=token, cache_dir=cache))

    artifacts = list(Artifact.objects.filter(release__slug=SLUG))
    assert artifacts
    for artifact in artifacts:
        assert sha256(folder / artifact.repo_path) == artifact.sha256, artifact.repo_path
    assert folder.name == Release.objects.get(slug=SLUG).revision
    status = 302 if portal.storage.mode == "s3" else 200
    delivered = eventually(file_events, lambda n: n >= 2 * len(artifacts))
    outcomes = sorted(DownloadEvent.objects.values_list("outcome", "status_code"))
    wanted = "redirected" if portal.storage.mode == "s3" else "served"
    assert outcomes == sorted(
        [("head", 200)] * len(artifacts) + [(wanted, status)] * len(artifacts)
    )
    # The grant's link paid for one copy of each file, as a /d/<token>/ download would.
    link = granted.download_links.get(revoked_at__isnull=True)
    assert set(DownloadEvent.objects.values_list("link_id", flat=True)) == {link.pk}
    assert set(DownloadEvent.objects.values_list("user_id", flat=True)) == {granted.user_id}
    charged = dict(LinkUsage.objects.filter(link=link).values_list("artifact_id", "bytes_charged"))
    assert charged == {a.pk: a.size for a in artifacts}

    again = Path(snapshot_download(repo(), endpoint=portal.url, token=token, cache_dir=cache))

    assert again == folder
    assert file_events() == delivered  # not a HEAD, not a GET


def test_hf_hub_download_of_one_file(portal, granted, token, tmp_path):
    artifact = Artifact.objects.get(release__slug=SLUG, path="7B/params.json")
    path = hf_hub_download(
        repo(), "original/7B/params.json", endpoint=portal.url, token=token, cache_dir=tmp_path
    )
    assert sha256(Path(path)) == artifact.sha256


def test_the_hf_download_cli(portal, granted, token, tmp_path):
    out = tmp_path / "out"
    env = process_env(
        {
            "HF_ENDPOINT": portal.url,
            "HF_TOKEN": token,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    hf = Path(sys.executable).parent / "hf"
    run = subprocess.run(
        [str(hf), "download", repo(), "--local-dir", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for artifact in Artifact.objects.filter(release__slug=SLUG):
        assert sha256(out / artifact.repo_path) == artifact.sha256


def test_revocation_raises_gated_repo_error_with_the_portals_message(
    portal, granted, token, tmp_path, reviewer
):
    grant_revoke(grant=granted, reviewer=reviewer, reason="Terms breached.")
    with pytest.raises(GatedRepoError) as raised:
        hf_hub_download(
            repo(), "original/7B/params.json", endpoint=portal.url, token=token, cache_dir=tmp_path
        )
    assert f"Your access to {Release.objects.get(slug=SLUG)} was revoked" in str(raised.value)
    assert raised.value.response.status_code == 403


def test_no_grant_and_no_token_are_gated_with_what_to_do(
    portal, release, token, tmp_path, license_v1
):
    with pytest.raises(GatedRepoError) as raised:
        hf_hub_download(
            repo(), "original/7B/params.json", endpoint=portal.url, token=token, cache_dir=tmp_path
        )
    assert "You have no access to" in str(raised.value) and "/apply/" in str(raised.value)
    with pytest.raises(GatedRepoError) as raised:
        hf_hub_download(
            repo(), "original/7B/params.json", endpoint=portal.url, token=False, cache_dir=tmp_path
        )
    assert "send a portal API token" in str(raised.value)
    assert raised.value.response.status_code == 401


def test_a_bad_token_is_refused_and_says_where_to_get_one(portal, release, tmp_path):
    with pytest.raises(HfHubHTTPError) as raised:
        hf_hub_download(
            repo(),
            "original/7B/params.json",
            endpoint=portal.url,
            token="lap_" + "0" * 64,
            cache_dir=tmp_path,
        )
    assert raised.value.response.status_code == 401
    assert "/account/api-tokens/" in str(raised.value)
    assert not isinstance(raised.value, RepositoryNotFoundError)
    with pytest.raises(HTTPError) as raised:  # whoami() wraps the client's error
        HfApi(endpoint=portal.url, token="lap_" + "0" * 64).whoami()
    assert raised.value.__cause__.response.status_code == 401


def test_whoami_names_the_tokens_owner(portal, alice, token):
    me = HfApi(endpoint=portal.url, token=token).whoami()
    assert me["name"] == alice.username
    assert me["auth"]["accessToken"]["displayName"] == "hf"


def test_missing_repo_revision_and_file_raise_the_clients_own_errors(
    portal, granted, token, tmp_path
):
    hub = HfApi(endpoint=portal.url, token=token)
    with pytest.raises(RepositoryNotFoundError):
        hub.model_info(f"{settings.WEIGHTS_HUB_NAMESPACE}/llama-1000b")
    with pytest.raises(RepositoryNotFoundError):
        hub.model_info(f"elsewhere/{SLUG}")
    with pytest.raises(RevisionNotFoundError):
        hub.model_info(repo(), revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(
            repo(), "original/7B/nothing.bin", endpoint=portal.url, token=token, cache_dir=tmp_path
        )


def test_model_info_is_public_and_lists_files_with_sizes(portal, release):
    info = HfApi(endpoint=portal.url, token=False).model_info(repo(), files_metadata=True)
    assert info.id == repo()
    assert info.sha == Release.objects.get(slug=SLUG).revision
    assert info.gated == "manual"
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {a.repo_path: a.size for a in Artifact.objects.filter(release__slug=SLUG)}
    assert all(s.lfs.sha256 for s in info.siblings)


def test_the_hub_door_spends_the_links_budget(portal, granted, token, tmp_path):
    """A link with its budget spent (by another machine) refuses the Hub door as well."""
    from weights.services.links import link_issue

    link = link_issue(grant=granted, budget_copies=1).link
    artifact = Artifact.objects.get(release__slug=SLUG, path="7B/params.json")
    LinkUsage.objects.filter(link=link, artifact=artifact).update(
        bytes_charged=artifact.size + min(settings.WEIGHTS_BUDGET_SLACK_BYTES, artifact.size)
    )
    with pytest.raises(HfHubHTTPError) as raised:
        hf_hub_download(
            repo(), "original/7B/params.json", endpoint=portal.url, token=token, cache_dir=tmp_path
        )
    assert raised.value.response.status_code == 429
    assert "budget" in str(raised.value).lower()
    event = DownloadEvent.objects.filter(link=link, outcome="budget").get()
    assert event.artifact_id == artifact.pk


# --- the link door's rules, through the Hub door ------------------------------------------------


def _fetch(portal, token, tmp_path) -> Path:
    return Path(
        hf_hub_download(
            repo(), "original/7B/params.json", endpoint=portal.url, token=token, cache_dir=tmp_path
        )
    )


def test_a_new_license_gates_the_hub_until_accepted(portal, granted, token, tmp_path):
    from access.services.licenses import license_publish

    license_publish(name="Research license", version="2", text="New terms.")
    with pytest.raises(GatedRepoError) as raised:
        _fetch(portal, token, tmp_path / "a")
    assert "The license changed to version 2" in str(raised.value)
    assert "/license/accept/" in str(raised.value)
    link = granted.download_links.get(revoked_at__isnull=True)
    assert DownloadEvent.objects.filter(link=link, outcome="license").count() == 1


def test_a_link_a_reviewer_revoked_stays_revoked_on_the_hub(
    portal, granted, token, tmp_path, reviewer
):
    from weights.services.links import link_issue, link_revoke

    live = link_issue(grant=granted).link
    link_revoke(link=live, actor=reviewer, reason="Shared on a forum.")
    with pytest.raises(GatedRepoError) as raised:
        _fetch(portal, token, tmp_path / "a")
    assert "This download link was revoked" in str(raised.value)
    assert granted.download_links.filter(revoked_at__isnull=True).count() == 0  # none issued
    link_issue(grant=granted)  # a fresh link from My downloads opens both doors again
    assert sha256(_fetch(portal, token, tmp_path / "b")) == (
        Artifact.objects.get(release__slug=SLUG, path="7B/params.json").sha256
    )


def test_an_expired_link_is_replaced_for_the_hub_and_the_new_one_is_not_emailed(
    portal, granted, token, tmp_path, mailoutbox
):
    from django.utils import timezone

    from weights.services.links import link_issue

    old = link_issue(grant=granted).link
    type(old).objects.filter(pk=old.pk).update(expires_at=timezone.now())
    sent = len(mailoutbox)

    assert sha256(_fetch(portal, token, tmp_path)) == (
        Artifact.objects.get(release__slug=SLUG, path="7B/params.json").sha256
    )
    old.refresh_from_db()
    new = granted.download_links.get(revoked_at__isnull=True)
    assert new.pk != old.pk and old.revoked_at is not None
    assert new.emailed_at is None and len(mailoutbox) == sent
    delivered = ("served", "redirected")  # redirected: to S3
    served = DownloadEvent.objects.filter(link=new, outcome__in=delivered).exists
    assert eventually(served, bool)  # written when the stream closes


def test_a_disabled_account_is_gated(portal, granted, token, tmp_path, alice):
    type(alice).objects.filter(pk=alice.pk).update(is_active=False)
    with pytest.raises(HfHubHTTPError) as raised:
        _fetch(portal, token, tmp_path)
    assert raised.value.response.status_code in (401, 403)
