"""Download events through the per-process journal: batched, and not lost when a process dies.

Assertions are on DownloadEvent rows, DownloadLink.flagged_at and the journal files on
disk; the processes that die are real ones (a fork, a Python subprocess, gunicorn).
"""

from __future__ import annotations

import fcntl
import http.client
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from tests.servers import (
    free_port,
    healthz_answers,
    process_env,
    started,
    test_database_url,
    wait_for,
)
from tests.weights import test_serving
from tests.weights.test_serving import SHARD, artifact
from weights.models import DownloadEvent, DownloadLink
from weights.services import event_journal, events, links
from weights.services.event_journal import journal_flush
from weights.tasks import flush_download_events
from weights.tokens import token_hash

pytestmark = pytest.mark.django_db

# The published llama-7b release, alice's grant and a link to it.
source, grant, token = test_serving.source, test_serving.grant, test_serving.token

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SUBPROCESS_TIMEOUT_S = 60


@pytest.fixture
def journal(settings, tmp_path) -> Path:
    """Batching on, and nothing flushed by itself: only the flushes a test makes."""
    settings.WEIGHTS_EVENT_BATCH = 100_000
    settings.WEIGHTS_EVENT_FLUSH_SECONDS = 3600
    settings.WEIGHTS_EVENT_JOURNAL_DIR = tmp_path / "journal"
    yield settings.WEIGHTS_EVENT_JOURNAL_DIR
    journal_flush(orphans=False)  # leave nothing of ours for the exit hook


@pytest.fixture
def link(token) -> DownloadLink:
    return DownloadLink.objects.select_related("grant__user").get(token_hash=token_hash(token))


def record(
    link=None, *, file=None, address="192.0.2.1", range_header="", nbytes=1, outcome="partial"
):
    events.download_event_record(
        link=link,
        user=link.grant.user if link else None,
        artifact=file,
        ip_address=address,
        user_agent="Wget/1.21.3",
        range_header=range_header,
        nbytes=nbytes,
        status_code=206,
        outcome=outcome,
    )


def journal_lines(directory: Path) -> list[bytes]:
    return [line for path in sorted(directory.glob("*")) for line in path.read_bytes().splitlines()]


def active_file(directory: Path) -> Path:
    [path] = directory.glob("*.active")
    return path


def line_for(**fields) -> bytes:
    """A journal line as download_event_record writes it, with `fields` changed."""
    record = {
        "journal_id": str(uuid.uuid4()),
        "created_at": T0.isoformat(),
        "link_id": None,
        "user_id": None,
        "artifact_id": None,
        "ip_address": "192.0.2.9",
        "user_agent": "curl/8.5.0",
        "range_header": "",
        "bytes": 0,
        "status_code": 404,
        "outcome": "not_found",
        **fields,
    }
    return (json.dumps(record) + "\n").encode()


# --- in this process ---------------------------------------------------------------------


def test_with_batch_1_the_row_exists_when_the_call_returns_and_no_file_is_written(
    settings, tmp_path, link
):
    settings.WEIGHTS_EVENT_BATCH = 1
    settings.WEIGHTS_EVENT_JOURNAL_DIR = tmp_path / "journal"
    record(link, range_header="bytes=0-0")
    assert list(DownloadEvent.objects.values_list("link", "range_header")) == [
        (link.pk, "bytes=0-0")
    ]
    assert not (tmp_path / "journal").exists()


def test_recording_makes_no_query_and_a_flush_inserts_exactly_those_events(
    journal, link, monkeypatch, django_assert_num_queries
):
    times = iter([T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)])
    monkeypatch.setattr(events, "_now", lambda: next(times))
    shard = artifact()
    with django_assert_num_queries(0):
        record(link, file=shard, range_header="bytes=0-99", nbytes=100)
        record(None, address=None, nbytes=0, outcome="invalid")
        record(link, file=shard, address="2001:DB8:0:0::7", nbytes=7, outcome="served")
    assert len(journal_lines(journal)) == 3
    assert DownloadEvent.objects.count() == 0

    assert journal_flush() == 3
    rows = DownloadEvent.objects.order_by("created_at").values_list(
        "created_at", "link", "user", "artifact", "ip_address", "range_header", "bytes", "outcome"
    )
    user = link.grant.user_id
    assert list(rows) == [
        (T0, link.pk, user, shard.pk, "192.0.2.1", "bytes=0-99", 100, "partial"),
        (T0 + timedelta(seconds=1), None, None, None, None, "", 0, "invalid"),
        (T0 + timedelta(seconds=2), link.pk, user, shard.pk, "2001:db8::7", "", 7, "served"),
    ]
    assert DownloadEvent.objects.filter(journal_id__isnull=True).count() == 0
    assert list(journal.iterdir()) == []
    assert journal_flush() == 0


def test_a_journal_ingested_twice_inserts_nothing_twice(journal, link):
    for i in range(3):
        record(link, range_header=f"bytes={i}-{i}")
    copy = active_file(journal).read_bytes()
    assert journal_flush() == 3
    assert journal_flush() == 0
    # A crash between the commit and the delete leaves the file: the next sweep finds it.
    (journal / "4242-crashed.sealed").write_bytes(copy)
    assert flush_download_events.delay().get() == 0
    assert DownloadEvent.objects.count() == 3
    assert list(journal.iterdir()) == []


def test_a_malformed_line_is_logged_and_skipped_and_the_rest_inserted(journal, link, caplog):
    record(link, range_header="bytes=0-0")
    with active_file(journal).open("ab") as out:
        out.write(b"not json\n")
        out.write(b'{"journal_id": "' + str(uuid.uuid4()).encode() + b'"}\n')
        out.write(line_for(outcome="exploded"))
        out.write(line_for(ip_address="999.1.1.1"))
        out.write(line_for(created_at="2026-12-01T12:00:00"))
        out.write(line_for(status_code=-1))
        out.write(b'{"journal_id": "trunc')  # a write cut short, then the next line
    record(link, range_header="bytes=1-1")
    with caplog.at_level(logging.ERROR, logger=event_journal.__name__):
        assert journal_flush() == 1  # the cut line swallowed the second record's line
    assert sorted(DownloadEvent.objects.values_list("range_header", flat=True)) == ["bytes=0-0"]
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 7
    assert list(journal.iterdir()) == []


def test_events_of_deleted_links_go_and_of_deleted_files_keep_their_row(journal, link):
    journal.mkdir()
    with (journal / "4242-old.sealed").open("wb") as out:
        out.write(line_for(link_id=999_999, range_header="gone link"))
        out.write(line_for(link_id=link.pk, artifact_id=999_999, range_header="gone file"))
        out.write(line_for(user_id=999_999, range_header="gone user"))
    assert journal_flush() == 1
    assert list(DownloadEvent.objects.values_list("link", "artifact", "range_header")) == [
        (link.pk, None, "gone file")
    ]


@pytest.mark.django_db(transaction=True)
def test_a_row_the_database_refuses_is_logged_and_skipped_and_the_rest_inserted(
    journal, link, grant, monkeypatch, caplog
):
    doomed = links.link_issue(grant=grant).link
    record(doomed, range_header="doomed")
    record(link, range_header="kept")
    record(None, range_header="anonymous")
    checked = event_journal._with_live_references

    def and_then_deleted(events):
        """A reviewer deletes the link between the check and the commit."""
        live = checked(events)
        DownloadLink.objects.filter(pk=doomed.pk).delete()
        return live

    monkeypatch.setattr(event_journal, "_with_live_references", and_then_deleted)
    with caplog.at_level(logging.ERROR, logger=event_journal.__name__):
        assert journal_flush() == 2
    assert sorted(DownloadEvent.objects.values_list("range_header", flat=True)) == [
        "anonymous",
        "kept",
    ]
    assert [r for r in caplog.records if "refused" in r.getMessage()]
    assert list(journal.iterdir()) == []


def test_the_flush_flags_a_link_once_a_new_address_takes_it_over_the_limit(journal, link, settings):
    settings.WEIGHTS_LINK_MAX_IPS = 2
    for address in ["192.0.2.1", "192.0.2.2", "192.0.2.1"]:
        record(link, address=address)
    journal_flush()
    link.refresh_from_db()
    assert link.flagged_at is None

    record(link, address="192.0.2.3")
    link.refresh_from_db()
    assert link.flagged_at is None  # not before the batch is inserted
    journal_flush()
    link.refresh_from_db()
    assert link.flagged_at is not None

    # A reviewer clears the flag: known addresses do not raise it again, a new one does.
    DownloadLink.objects.filter(pk=link.pk).update(flagged_at=None)
    record(link, address="192.0.2.1")
    journal_flush()
    link.refresh_from_db()
    assert link.flagged_at is None
    record(link, address="2001:db8::7")
    journal_flush()
    link.refresh_from_db()
    assert link.flagged_at is not None


def test_a_forked_child_journals_to_its_own_file_and_its_lines_arrive_after_it_dies(journal, link):
    record(link, range_header="parent")
    parent_file = active_file(journal)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: journal two events, then die without any flush or exit hook
        try:
            record(None, range_header="child 1")
            record(None, range_header="child 2")
            os.write(write_end, b"ok")
        finally:
            os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 2) == b"ok"
    os.close(read_end)
    os.waitpid(pid, 0)
    [child_file] = [p for p in journal.glob("*.active") if p != parent_file]
    assert len(child_file.read_bytes().splitlines()) == 2
    assert len(parent_file.read_bytes().splitlines()) == 1

    assert journal_flush() == 3  # ours, and the dead child's file whose lock is free
    assert sorted(DownloadEvent.objects.values_list("range_header", flat=True)) == [
        "child 1",
        "child 2",
        "parent",
    ]
    assert list(journal.iterdir()) == []


def test_ten_thousand_events_arrive_in_one_flush(journal, link):
    for i in range(10_000):
        record(link, address=f"10.0.{i // 250}.{i % 250}", nbytes=i)
    assert journal_flush() == 10_000
    assert DownloadEvent.objects.count() == 10_000
    assert DownloadEvent.objects.values("journal_id").distinct().count() == 10_000
    assert sum(DownloadEvent.objects.values_list("bytes", flat=True)) == sum(range(10_000))


# --- other processes ---------------------------------------------------------------------


def portal_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Production settings on the test database, nothing of this test run's environment."""
    (tmp_path / "var").mkdir(exist_ok=True)
    return process_env(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "DEBUG": "0",
            "SECRET_KEY": django_settings.SECRET_KEY + "-" + "x" * 50,
            "ALLOWED_HOSTS": "127.0.0.1",
            "SECURE_SSL_REDIRECT": "0",
            "DATABASE_URL": test_database_url(),
            "DATABASE_CONN_MAX_AGE": "0",
            "REDIS_URL": "",
            "PORTAL_VAR_DIR": str(tmp_path / "var"),
            "WEIGHTS_EVENT_JOURNAL_DIR": str(tmp_path / "journal"),
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )


RECORDER = """
import os, sys, time
import django
django.setup()
from weights.models import DownloadEvent
from weights.services.events import download_event_record

def record(n):
    for i in range(n):
        download_event_record(
            link=None, user=None, artifact=None, ip_address="192.0.2.1", user_agent="x",
            range_header="", nbytes=1, status_code=404, outcome="not_found",
        )

def wait_for_rows(n):
    deadline = time.monotonic() + 20
    while DownloadEvent.objects.count() < n and time.monotonic() < deadline:
        time.sleep(0.05)
    print("rows", DownloadEvent.objects.count(), flush=True)
"""


def run_python(script: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", RECORDER + textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.django_db(transaction=True)
def test_a_full_batch_is_inserted_by_the_flusher_thread_and_exit_inserts_the_rest(tmp_path):
    env = portal_env(tmp_path, WEIGHTS_EVENT_BATCH="10", WEIGHTS_EVENT_FLUSH_SECONDS="3600")
    out = run_python("record(10); wait_for_rows(10); record(5)", env)
    assert out.splitlines() == ["rows 10"]
    assert DownloadEvent.objects.count() == 15  # the 5 pending ones at exit (atexit)
    assert list((tmp_path / "journal").iterdir()) == []


@pytest.mark.django_db(transaction=True)
def test_quiet_lines_are_inserted_within_the_flush_period(tmp_path):
    env = portal_env(tmp_path, WEIGHTS_EVENT_BATCH="1000", WEIGHTS_EVENT_FLUSH_SECONDS="1")
    out = run_python("record(3); wait_for_rows(3); sys.stdout.flush(); os._exit(0)", env)
    assert out.splitlines() == ["rows 3"]  # os._exit: no exit hook ran, the thread did it


@pytest.mark.django_db(transaction=True)
def test_a_gunicorn_killed_with_sigkill_loses_no_event_and_none_arrives_twice(
    settings, tmp_path, token
):
    requests = 50
    port = free_port()
    env = portal_env(
        tmp_path,
        WEIGHTS_STORAGE="local",
        WEIGHTS_LOCAL_ROOT=str(settings.WEIGHTS_LOCAL_ROOT),
        WEIGHTS_EVENT_BATCH="1000",
        WEIGHTS_EVENT_FLUSH_SECONDS="3600",  # nothing is inserted unless we flush
        GUNICORN_BIND=f"127.0.0.1:{port}",
        GUNICORN_WORKERS="1",
        GUNICORN_THREADS="4",
    )
    log = tmp_path / "gunicorn.log"
    directory = tmp_path / "journal"
    args = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py"]
    with started(args, env=env, log=log) as process:
        wait_for(lambda: healthz_answers(port), "gunicorn", log=log, timeout=60, process=process)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(requests):
            connection.request("GET", f"/d/{token}/{SHARD}", headers={"Range": f"bytes={i}-{i}"})
            response = connection.getresponse()
            assert (response.status, len(response.read())) == (206, 1)
        connection.close()
        # The event is journalled as the response ends: wait for the last line, then kill.
        wait_for(lambda: len(journal_lines(directory)) == requests, "journal", timeout=10)
        assert DownloadEvent.objects.count() == 0
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # The worker outlives its master by a moment: its lock goes when the kernel ends it.
        wait_for(lambda: all(unlocked(p) for p in directory.iterdir()), "lock", timeout=10)

    settings.WEIGHTS_EVENT_JOURNAL_DIR = directory
    out = io.StringIO()
    call_command("flush_download_events", stdout=out)
    assert out.getvalue().strip() == f"{requests} download events inserted"
    ranges = list(DownloadEvent.objects.values_list("range_header", flat=True))
    assert sorted(ranges) == sorted(f"bytes={i}-{i}" for i in range(requests))
    call_command("flush_download_events", stdout=io.StringIO())
    assert DownloadEvent.objects.count() == requests
    assert list(directory.iterdir()) == []


def unlocked(path: Path) -> bool:
    with path.open("rb") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True
