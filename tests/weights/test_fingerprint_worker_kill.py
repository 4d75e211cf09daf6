"""A worker killed while it prepares a grantee's copy loses nothing: what it committed
stays, the next run (the task's redelivery, or the periodic sweep for grants without a
link) does only the rest, and the link is emailed once, with checksums of the bytes served.

The worker is a real process on the test database, SIGKILLed by itself as it starts on
the second file, so the first file's row has committed and the rest has not."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.core import mail

from access.services import reviews
from tests.servers import ROOT, process_env, test_database_url
from tests.weights.fingerprinted import publish_demo
from weights.models import RecipientCopy
from weights.services import fingerprinting
from weights.services.fingerprinting import release_mark_fingerprinted

DIES_ON_SECOND_FILE = textwrap.dedent(
    """
    import os, signal, sys
    import django
    django.setup()
    from weights.services import fingerprinting
    opened = []
    real = fingerprinting.open_copy

    def open_then_die(grant, artifact):
        if opened:  # the first file's row has committed: die as the OOM killer would
            os.kill(os.getpid(), signal.SIGKILL)
        opened.append(artifact.path)
        return real(grant, artifact)

    fingerprinting.open_copy = open_then_die
    from weights.tasks import issue_download_link
    issue_download_link.apply(args=[int(sys.argv[1])])
    """
)


@pytest.fixture
def store(local_storage) -> Path:
    return local_storage.root


@pytest.mark.django_db(transaction=True)
def test_a_killed_worker_leaves_the_rest_to_the_next_run(
    store, releases, alice, reviewer, make_submitted, tmp_path, monkeypatch
):
    release = publish_demo(tmp_path)
    release = release_mark_fingerprinted(release=release)
    # The approval queues the task; here no worker takes it until the one below.
    queued: list[int] = []
    monkeypatch.setattr("weights.tasks.issue_download_link.delay", queued.append)
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = reviews.application_approve(
        application=application, reviewer=reviewer, releases=[release]
    )
    assert queued == [grant.pk]
    monkeypatch.undo()

    env = process_env(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "DATABASE_URL": test_database_url(),
            "REDIS_URL": "",
            "WEIGHTS_STORAGE": "local",
            "WEIGHTS_LOCAL_ROOT": str(store),
            "PORTAL_VAR_DIR": str(tmp_path / "var"),
        }
    )
    worker = subprocess.run(
        [sys.executable, "-c", DIES_ON_SECOND_FILE, str(grant.pk)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == -signal.SIGKILL, worker.stderr[-3000:]
    [first] = RecipientCopy.objects.filter(grant=grant)
    assert first.state == "ready" and first.artifact.path == "consolidated.00.pth"
    assert not [m for m in mail.outbox if "download link" in m.subject]  # nothing sent

    # The periodic sweep finds the grant without a link and finishes the job.
    from weights.tasks import issue_missing_links

    issue_missing_links()
    copies = {c.artifact.path: c for c in RecipientCopy.objects.filter(grant=grant)}
    assert sorted(copies) == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth"]
    assert all(c.state == "ready" for c in copies.values())
    assert copies["consolidated.00.pth"].prepared_at == first.prepared_at  # not redone
    for path, copy in copies.items():
        handle = fingerprinting.open_copy(grant, release.artifacts.get(path=path))
        try:
            data = handle.read()
        finally:
            handle.close()
        assert hashlib.sha256(data).hexdigest() == copy.sha256, path
    # Redelivered after all (acks_late): nothing more is done or sent.
    from weights.tasks import issue_download_link

    assert issue_download_link(grant.pk) is False
    sent = [m for m in mail.outbox if "download link" in m.subject]
    assert len(sent) == 1 and sent[0].to == [alice.email]
    assert re.search(r"/d/[A-Za-z0-9_-]{32}/", sent[0].body)


@pytest.mark.django_db(transaction=True)
def test_one_preparing_run_per_grant_and_not_on_the_mail_queue(
    store, releases, alice, reviewer, make_submitted, tmp_path, monkeypatch, settings
):
    from weights.tasks import prepare_recipient_copies

    release = publish_demo(tmp_path)
    release = release_mark_fingerprinted(release=release)
    monkeypatch.setattr("weights.tasks.issue_download_link.delay", lambda grant_id: None)
    application = make_submitted(alice, slugs=("llama-7b",))
    [grant] = reviews.application_approve(
        application=application, reviewer=reviewer, releases=[release]
    )
    with fingerprinting.preparing(grant.pk) as first:
        assert first
        assert prepare_recipient_copies(grant.pk) == 0  # the sweep asking again meanwhile
        assert not RecipientCopy.objects.filter(grant=grant).exists()
    assert prepare_recipient_copies(grant.pk) == 3
    assert prepare_recipient_copies(grant.pk) == 0  # nothing left to do
    # Its own limits, far above the link task's, and the default queue, not the mail one.
    task = prepare_recipient_copies
    assert task.soft_time_limit == settings.WEIGHTS_FINGERPRINT_PREPARE_LIMIT_S > 3600
    assert task.time_limit > task.soft_time_limit
    assert task.name not in settings.CELERY_TASK_ROUTES
