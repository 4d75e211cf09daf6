"""Real clients against a real portal, at a budget of one copy per file.

wget -c, curl -C -, aria2c -c and the project CLI each fetch a 32 MiB file of random bytes at
about 16 MiB/s, are killed past a third and past two thirds, and are run once more to the
end; aria2c also fetches it in 16 parallel segments; and a second address asks for the file
once the first has it. The portal is gunicorn as deployed (deploy/gunicorn.conf.py) in each
serving mode: Django streaming the file (local), nginx with deploy/nginx/default.conf sending
it after Django's X-Accel-Redirect (xaccel), and a redirect to a presigned GET on S3 (moto).

What must hold: the file arrives exact; the link's charge for it stays within one copy plus
the slack, min(WEIGHTS_BUDGET_SLACK_BYTES, size); a cut and a resume from the same address,
or parallel segments, cost nothing twice; a different address gets 429 and no bytes. Each
case prints what it was charged over one copy and how each run ended (`pytest -rA` shows it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings

from access.services.reviews import application_approve
from tests.conftest import require_tools, skip_unless_required
from tests.servers import LOG_TAIL, nginx_binary, nginx_running, portal_gunicorn
from tests.weights.clients import (
    CLIENTS,
    Client,
    Target,
    aria2c,
    curl_once,
    eventually,
    run_client,
    size,
)
from tests.weights.conftest import ServerStorage, server_storage, share_storage
from weights.models import Artifact, DownloadEvent, DownloadLink, LinkUsage
from weights.services.links import link_issue
from weights.services.publishing import release_publish
from weights.storage import reset_storage

pytestmark = pytest.mark.django_db(transaction=True)

MIB = 1024 * 1024
SIZE = 32 * MIB
PATH = "7B/consolidated.00.pth"
RATE = 16 * MIB  # bytes per second: a 32 MiB file takes about 2 s, so each cut lands mid-file
MODES = ("local", "xaccel", "s3")
X_ACCEL_PREFIX = "/protected-weights/"


@dataclass(frozen=True)
class Source:
    directory: Path
    sha256: str


@dataclass(frozen=True)
class Portal:
    mode: str
    url: str  # where clients connect: gunicorn, or nginx in front of it
    log: Path
    storage: ServerStorage
    headers: dict[str, str] = field(default_factory=dict)  # what every client sends


@dataclass(frozen=True)
class Issued:
    link: DownloadLink
    artifact: Artifact
    target: Target


# --- servers, once per mode ------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Source:
    directory = tmp_path_factory.mktemp("release")
    data = os.urandom(SIZE)
    (directory / PATH).parent.mkdir(parents=True)
    (directory / PATH).write_bytes(data)
    return Source(directory=directory, sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module", params=MODES)
def portal(request, django_db_setup, tmp_path_factory) -> Iterator[Portal]:
    """gunicorn on the test database in one serving mode (nginx in front for xaccel)."""
    mode = request.param
    tmp = tmp_path_factory.mktemp(mode)
    nginx = ""
    if mode == "xaccel":
        nginx = nginx_binary() or ""
        if not nginx:
            skip_unless_required("nginx not installed (apt-get install nginx-light)")
    with contextlib.ExitStack() as stack:
        storage = stack.enter_context(server_storage(request, tmp, mode))
        env = dict(storage.env)
        if nginx:
            env["WEIGHTS_X_ACCEL_PREFIX"] = X_ACCEL_PREFIX
        root = storage.local_root
        port, log = stack.enter_context(portal_gunicorn(tmp, env, threads=16))  # aria2c -x16
        url, front = f"http://127.0.0.1:{port}", {}
        if nginx:
            # nginx on a port of its own: it passes the client's Host on, port included, so
            # the manifest's absolute URLs lead back to it.
            at = stack.enter_context(nginx_running(nginx, port, tmp, root))
            url = f"http://127.0.0.1:{at}"
            # What an outer TLS terminator adds.
            front = {"headers": {"X-Forwarded-Proto": "https"}}
        yield Portal(mode=mode, url=url, log=log, storage=storage, **front)


# --- a link per test ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _same_storage(portal, settings, monkeypatch):
    share_storage(portal.storage, settings, monkeypatch)
    yield
    reset_storage()


@pytest.fixture
def issued(portal, source, alice, reviewer, make_submitted, releases) -> Issued:
    """The file published (stored once per mode: keys are content-addressed) and alice's
    link to it, one copy per file."""
    release_publish(directory=source.directory, slug="llama-7b")
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = application_approve(
        application=application, reviewer=reviewer, releases=[releases["llama-7b"]]
    )
    new = link_issue(grant=grant, budget_copies=1)
    target = Target(
        landing=portal.url + f"/d/{new.token}/",
        file=portal.url + f"/d/{new.token}/{PATH}",
        path=PATH,
    )
    return Issued(link=new.link, artifact=Artifact.objects.get(path=PATH), target=target)


def charged(issued: Issued) -> int:
    usage = LinkUsage.objects.filter(link=issued.link, artifact=issued.artifact).first()
    return usage.bytes_charged if usage else 0


def bound() -> int:
    return SIZE + min(settings.WEIGHTS_BUDGET_SLACK_BYTES, SIZE)


def settled_charge(issued: Issued) -> int:
    """The charge once the server has settled the last stream (local mode settles on close)."""
    return eventually(lambda: charged(issued), lambda value: value <= bound())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def log_tail(log: Path) -> str:
    return log.read_text()[-LOG_TAIL:] if log.exists() else ""


# --- the matrix ----------------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS, ids=lambda client: client.name)
def test_a_download_cut_twice_resumes_to_the_exact_file_within_one_copy(
    portal, issued, source, client: Client, tmp_path
):
    require_tools(client.tool)
    dest, log = tmp_path / "dest", tmp_path / "client.log"
    dest.mkdir()
    argv = client.argv(issued.target, dest, headers=portal.headers, rate=RATE)
    watched = client.partial(issued.target, dest)

    runs = [
        run_client(argv, watched, log=log, kill_past=SIZE // 3),
        run_client(argv, watched, log=log, kill_past=2 * SIZE // 3),
        run_client(argv, watched, log=log),
    ]

    over = settled_charge(issued) - SIZE
    print(
        f"{portal.mode}/{client.name}: charged - size = {over} B; runs: {', '.join(map(str, runs))}"
    )
    assert runs[-1].status == 0, f"runs: {runs}\n{log_tail(log)}\n{log_tail(portal.log)}"
    assert sha256(client.final(issued.target, dest)) == source.sha256
    assert SIZE + over <= bound()


RANGED_STATUS = {"local": 206, "xaccel": 206, "s3": 302}


def test_aria2c_in_sixteen_parallel_segments_gets_the_file_within_one_copy(
    portal, issued, source, tmp_path
):
    require_tools("aria2c")
    dest, log = tmp_path / "dest", tmp_path / "client.log"
    dest.mkdir()
    argv = aria2c(issued.target, dest, headers=portal.headers)
    argv += ["-x16", "-s16", "-k1M", f"--max-overall-download-limit={RATE}", issued.target.file]
    final = dest / "consolidated.00.pth"

    run = run_client(argv, final, log=log)

    ranged = eventually(
        lambda: (
            DownloadEvent.objects.filter(link=issued.link, status_code=RANGED_STATUS[portal.mode])
            .exclude(range_header="")
            .count()
        ),
        lambda count: count >= 8,
    )
    over = settled_charge(issued) - SIZE
    print(f"{portal.mode}/aria2c -x16: charged - size = {over} B; {ranged} ranged requests; {run}")
    assert run.status == 0, f"{run}\n{log_tail(log)}\n{log_tail(portal.log)}"
    assert sha256(final) == source.sha256
    assert SIZE + over <= bound()
    assert ranged >= 8  # really in parallel segments, each asked with its own Range


def test_a_second_address_gets_429_and_no_bytes_once_the_first_has_the_copy(
    portal, issued, source, tmp_path
):
    require_tools("curl")
    first, second = tmp_path / "a", tmp_path / "b"

    a = curl_once(issued.target.file, first, address="127.0.0.1", headers=portal.headers)
    b = curl_once(issued.target.file, second, address="127.0.0.2", headers=portal.headers)

    over = settled_charge(issued) - SIZE
    seen_from_b = eventually(
        lambda: list(
            DownloadEvent.objects.filter(link=issued.link, ip_address="127.0.0.2").values_list(
                "status_code", "bytes"
            )
        ),
        bool,
    )
    print(f"{portal.mode}/second address: charged - size = {over} B; A {a}, B {b}")
    assert a[1] == 0 and sha256(first) == source.sha256, (a, log_tail(portal.log))
    assert b[0] == 429 and size(second) == 0, b
    assert seen_from_b == [(429, 0)]
    assert SIZE + over <= bound()
