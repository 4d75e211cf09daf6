"""The Hub door's listings in a fingerprinted release, with the real `huggingface_hub` client
against a real gunicorn: each grantee's model_info and tree name their own bytes (the
SHA-256 that `hf_hub_download` and `snapshot_download` then fetch), a caller without a
grant sees each per-recipient file's size and no checksum, and a copy being prepared is
listed without one. A release that is not fingerprinted lists the published checksums.

The bundled demo model, published with its transformers variant as llama-7b on local
storage, is marked fingerprinted and granted to alice and bob; charlie has a token and no
grant.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from django.conf import settings
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.hf_api import RepoFile

from access.services import reviews
from access.tokens import token_create
from tests.servers import SERVER_SECRET_KEY, portal_gunicorn
from tests.weights.conftest import ServerStorage, server_storage, share_storage
from tests.weights.fingerprinted import DEMO, publish_demo
from tests.weights.test_hub_protocol import _server_done
from weights.models import Artifact, RecipientCopy, Release
from weights.services.fingerprinting import release_mark_fingerprinted
from weights.storage import reset_storage

pytestmark = pytest.mark.django_db(transaction=True)

SLUG = "llama-7b"
SHARD = "original/consolidated.00.pth"
PARAMS = "original/params.json"


@pytest.fixture(scope="module")
def portal(request, django_db_setup, tmp_path_factory) -> Iterator[tuple[str, ServerStorage]]:
    tmp = tmp_path_factory.mktemp("hub-fingerprinted")
    with contextlib.ExitStack() as stack:
        storage = stack.enter_context(server_storage(request, tmp, "local"))
        port, _log = stack.enter_context(portal_gunicorn(tmp, storage.env))
        yield f"http://127.0.0.1:{port}", storage


@pytest.fixture
def url(portal, settings, monkeypatch, tmp_path) -> Iterator[str]:
    endpoint, storage = portal
    settings.SECRET_KEY = SERVER_SECRET_KEY  # tokens are stamped with it
    share_storage(storage, settings, monkeypatch)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield endpoint
    _server_done()
    reset_storage()


def publish(releases, tmp_path: Path, *, fingerprinted: bool) -> Release:
    release = publish_demo(tmp_path, SLUG, transformers=True, work_dir=tmp_path)
    assert release.artifacts.filter(variant=Artifact.Variant.TRANSFORMERS).exists()
    return release_mark_fingerprinted(release=release) if fingerprinted else release


@pytest.fixture
def release(url, releases, tmp_path) -> Release:
    return publish(releases, tmp_path, fingerprinted=True)


def grant_to(user, release, make_submitted, reviewer) -> str:
    """Approve `user` for the release (the task prepares their copy) and return a Hub token."""
    application = make_submitted(user, slugs=(SLUG,))
    reviews.application_approve(application=application, reviewer=reviewer, releases=[release])
    return token_for(user)


def token_for(user) -> str:
    return token_create(user=user, name="hf", second_factor=False).secret


def repo() -> str:
    return f"{settings.WEIGHTS_HUB_NAMESPACE}/{SLUG}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_id(digest: str) -> str:
    return hashlib.sha1(digest.encode(), usedforsecurity=False).hexdigest()


def own_sums(user) -> dict[str, str]:
    """The user's ready copies, by repo path: the files that differ per recipient."""
    copies = RecipientCopy.objects.filter(grant__user=user, state=RecipientCopy.State.READY)
    return {c.artifact.repo_path: c.sha256 for c in copies.select_related("artifact")}


def siblings(url: str, token: str | bool) -> dict:
    info = HfApi(endpoint=url).model_info(repo(), token=token, files_metadata=True)
    return {s.rfilename: s for s in info.siblings}


def tree(url: str, token: str | bool) -> dict[str, RepoFile]:
    entries = HfApi(endpoint=url).list_repo_tree(repo(), recursive=True, token=token)
    return {e.path: e for e in entries if isinstance(e, RepoFile)}


def raw_listings(url: str, token: str | None) -> str:
    """model_info and the tree as the server sent them."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    info = requests.get(f"{url}/api/models/{repo()}", headers=headers, timeout=30)
    listing = requests.get(
        f"{url}/api/models/{repo()}/tree/main?recursive=true", headers=headers, timeout=30
    )
    assert info.status_code == listing.status_code == 200
    return info.text + listing.text


def test_each_grantee_lists_their_own_bytes_and_downloads_them(
    url, release, alice, bob, reviewer, make_submitted, tmp_path
):
    tokens = {u: grant_to(u, release, make_submitted, reviewer) for u in (alice, bob)}
    mine, theirs = own_sums(alice), own_sums(bob)
    assert SHARD in mine and any(p.endswith(".safetensors") for p in mine)
    assert mine.keys() == theirs.keys()
    published = {a.repo_path: a for a in release.artifacts.all()}

    for user, token in tokens.items():
        own = own_sums(user)
        listed, entries = siblings(url, token), tree(url, token)
        assert listed.keys() == entries.keys() == published.keys()
        for path, artifact in published.items():
            want = own.get(path, artifact.sha256)  # own bytes, or the same for everyone
            assert listed[path].lfs.sha256 == entries[path].lfs.sha256 == want, path
            assert listed[path].blob_id == entries[path].blob_id == blob_id(want), path
            assert listed[path].size == listed[path].lfs.size == artifact.size, path
            assert entries[path].size == artifact.size, path
        raw = raw_listings(url, token)
        for path in own:
            assert published[path].sha256 not in raw, path

    for path in mine:
        assert mine[path] != theirs[path], path
        assert published[path].sha256 not in (mine[path], theirs[path]), path

    # What each downloads is what their listing says.
    for user, token in tokens.items():
        listed = siblings(url, token)
        for path in (SHARD, "model.safetensors"):
            got = hf_hub_download(
                repo(), path, endpoint=url, token=token, cache_dir=tmp_path / user.username
            )
            assert sha256(Path(got).read_bytes()) == listed[path].lfs.sha256, (user, path)
    folder = Path(
        snapshot_download(repo(), endpoint=url, token=tokens[bob], cache_dir=tmp_path / "snap")
    )
    for path, sibling in siblings(url, tokens[bob]).items():
        assert sha256((folder / path).read_bytes()) == sibling.lfs.sha256, path


def test_without_a_grant_per_recipient_files_are_listed_without_a_checksum(
    url, release, alice, charlie, reviewer, make_submitted
):
    grant_to(alice, release, make_submitted, reviewer)
    per_recipient = own_sums(alice).keys()
    published = {a.repo_path: a for a in release.artifacts.all()}

    for token in (False, token_for(charlie)):  # anonymous, and a token without a grant
        listed, entries = siblings(url, token), tree(url, token)
        assert listed.keys() == entries.keys() == published.keys()
        for path, artifact in published.items():
            assert listed[path].size == entries[path].size == artifact.size, path
            if path in per_recipient:
                assert listed[path].lfs is None and entries[path].lfs is None, path
                assert listed[path].blob_id == entries[path].blob_id, path
                assert listed[path].blob_id != blob_id(artifact.sha256), path
            else:
                assert listed[path].lfs.sha256 == entries[path].lfs.sha256 == artifact.sha256
        raw = raw_listings(url, token or None)
        for path in per_recipient:
            assert published[path].sha256 not in raw, path
            assert blob_id(published[path].sha256) not in raw, path


def test_a_copy_being_prepared_is_listed_without_a_checksum(
    url, release, alice, reviewer, make_submitted
):
    token = grant_to(alice, release, make_submitted, reviewer)
    shard = release.artifacts.get(variant=Artifact.Variant.ORIGINAL, path="consolidated.00.pth")
    RecipientCopy.objects.filter(grant__user=alice, artifact=shard).delete()
    own = own_sums(alice)

    listed, entries = siblings(url, token), tree(url, token)
    assert listed[SHARD].lfs is None and entries[SHARD].lfs is None
    assert listed[SHARD].size == shard.size
    assert listed[SHARD].blob_id != blob_id(shard.sha256)
    assert shard.sha256 not in raw_listings(url, token)
    for path, digest in own.items():  # the files that are ready are listed as hers
        assert listed[path].lfs.sha256 == digest, path
    head = requests.head(
        f"{url}/{repo()}/resolve/main/{SHARD}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert head.status_code == 503 and shard.sha256 not in str(head.headers)


def test_a_release_not_fingerprinted_lists_the_published_checksums(
    url, releases, alice, reviewer, make_submitted, tmp_path
):
    release = publish(releases, tmp_path, fingerprinted=False)
    token = grant_to(alice, release, make_submitted, reviewer)
    published = {a.repo_path: a for a in release.artifacts.all()}

    for caller in (False, token):
        listed, entries = siblings(url, caller), tree(url, caller)
        assert listed.keys() == entries.keys() == published.keys()
        for path, artifact in published.items():
            assert listed[path].lfs.sha256 == entries[path].lfs.sha256 == artifact.sha256
            assert listed[path].blob_id == entries[path].blob_id == blob_id(artifact.sha256)
    got = hf_hub_download(repo(), SHARD, endpoint=url, token=token, cache_dir=tmp_path / "c")
    assert sha256(Path(got).read_bytes()) == published[SHARD].sha256


def test_grantees_sharing_one_hf_cache_each_get_their_own_copy(
    url, release, alice, bob, reviewer, make_submitted, tmp_path
):
    from huggingface_hub.errors import RevisionNotFoundError

    tokens = {u: grant_to(u, release, make_submitted, reviewer) for u in (alice, bob)}
    shared = tmp_path / "lab-hf-cache"  # one HF_HOME for the whole lab
    api = HfApi(endpoint=url)
    commits = {u: api.model_info(repo(), token=t).sha for u, t in tokens.items()}
    anonymous = api.model_info(repo(), token=False).sha
    assert len({commits[alice], commits[bob], anonymous}) == 3  # each grantee's own commit
    assert anonymous == release.revision

    for user, token in tokens.items():  # alice first, then bob, into the same cache
        path = hf_hub_download(repo(), SHARD, endpoint=url, token=token, cache_dir=shared)
        assert sha256(Path(path).read_bytes()) == own_sums(user)[SHARD], user.username
        assert f"/snapshots/{commits[user]}/" in path
        # Their own commit names the same files for them; another grantee's does not.
        again = hf_hub_download(
            repo(), PARAMS, revision=commits[user], endpoint=url, token=token, cache_dir=shared
        )
        assert Path(again).read_bytes() == (DEMO / "params.json").read_bytes()
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            repo(), PARAMS, revision=commits[alice], endpoint=url, token=tokens[bob],
            cache_dir=tmp_path / "bob-alone",
        )  # fmt: skip
