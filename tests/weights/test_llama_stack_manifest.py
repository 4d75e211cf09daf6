"""llama-stack.json: the manifest Meta's `llama download --source meta --manifest-file` reads.

llama-stack itself is not a dependency (it pulls in a whole serving stack), so the test
parses the file with the same pydantic models the tool declares (llama_stack/cli/download.py:
ModelEntry, Manifest), makes the expiry comparison it makes, and then fetches every file the
way its ParallelDownloader does: a HEAD for Content-Length, then a GET with
`Range: bytes=start-end`, following redirects.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from datetime import datetime

import pytest
from pydantic import BaseModel, ConfigDict

from access.models import Grant
from access.services.reviews import application_approve
from tests.weights.clients import eventually
from weights.management.commands.generate_sample_release import MIB, write_sample_release
from weights.models import Artifact, DownloadEvent
from weights.services.links import link_issue
from weights.services.publishing import release_publish

pytestmark = pytest.mark.django_db(transaction=True)


class ModelEntry(BaseModel):  # as llama-stack declares it
    model_id: str
    files: dict[str, str]

    model_config = ConfigDict(protected_namespaces=())


class Manifest(BaseModel):  # as llama-stack declares it
    models: list[ModelEntry]
    expires_on: datetime


@pytest.fixture
def token(local_storage, tmp_path, alice, reviewer, make_submitted, releases) -> str:
    """Alice's link to a published two-shard sample release."""
    source = tmp_path / "src"
    write_sample_release(source, size_label="7B", shards=2, shard_bytes=MIB, seed=5)
    release_publish(directory=source, slug="llama-7b")
    [grant] = application_approve(
        application=make_submitted(alice, slugs=("llama-7b",)),
        reviewer=reviewer,
        releases=[releases["llama-7b"]],
    )
    return link_issue(grant=grant).token


def fetch(request: urllib.request.Request) -> tuple[dict, bytes]:
    with urllib.request.urlopen(request) as response:  # noqa: S310 (the live server)
        return dict(response.headers), response.read()


def test_llama_download_manifest_lists_every_file_and_each_downloads_by_range(live_server, token):

    headers, body = fetch(urllib.request.Request(f"{live_server.url}/d/{token}/llama-stack.json"))

    manifest = Manifest(**json.loads(body))
    assert not datetime.now() > manifest.expires_on  # the tool's own check; must not raise
    [entry] = manifest.models
    assert entry.model_id == "llama-7b"
    artifacts = {a.path: a for a in Artifact.objects.filter(release__slug="llama-7b")}
    assert set(entry.files) == set(artifacts)
    assert "no-store" in headers["Cache-Control"]
    for name, url in entry.files.items():
        head, _ = fetch(urllib.request.Request(url, method="HEAD"))
        size = int(head["Content-Length"])
        assert size == artifacts[name].size
        ranged = urllib.request.Request(url, headers={"Range": f"bytes=0-{size - 1}"})
        _, data = fetch(ranged)
        assert hashlib.sha256(data).hexdigest() == artifacts[name].sha256, name
    served = DownloadEvent.objects.filter(outcome="served").count
    assert eventually(served, lambda n: n >= len(artifacts)) == len(artifacts)


def test_the_landing_page_offers_the_manifest_and_the_hub_commands(client, token, settings):
    page = client.get(f"/d/{token}/").content.decode()
    assert f"/d/{token}/llama-stack.json" in page
    assert "llama download --source meta --manifest-file llama-stack.json" in page
    assert f"hf download {settings.WEIGHTS_HUB_NAMESPACE}/llama-7b" in page


def test_a_replaced_link_gets_no_manifest(client, token):
    link_issue(grant=Grant.objects.get())  # replaces it
    response = client.get(f"/d/{token}/llama-stack.json")
    assert response.status_code == 403
    assert "models" not in response.json()
