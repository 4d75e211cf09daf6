"""DESIGN decision 6 while serving a fingerprinted file: a web process with the portal's
production settings serves a grantee their own copy (whole, and a range) through the link
door, computing the bytes (layout, marks, embedding), and has still not imported torch.

The bundled demo model is published as llama-7b on local storage, marked fingerprinted and
granted to alice in this process; a fresh interpreter serves it from the same database.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.core import mail

from access.services import reviews
from tests.servers import ROOT, gunicorn_env, process_env
from weights.models import RecipientCopy
from weights.services.fingerprinting import release_mark_fingerprinted
from weights.services.publishing import release_publish
from weights.storage import reset_storage

DEMO = ROOT / "inference_demo" / "demo_model"
SHARD = "consolidated.00.pth"

SCRIPT = """
import hashlib, json, sys
import django
django.setup()
import portal.wsgi  # noqa: F401
from django.test import Client
assert "torch" not in sys.modules, "imported before serving"
client = Client(HTTP_HOST="127.0.0.1")
whole = client.get(sys.argv[1])
body = b"".join(whole.streaming_content)
part = client.get(sys.argv[1], HTTP_RANGE="bytes=1001-70000")
print(json.dumps({
    "status": [whole.status_code, part.status_code],
    "sha256": hashlib.sha256(body).hexdigest(),
    "range_matches": b"".join(part.streaming_content) == body[1001:70001],
    "torch": "torch" in sys.modules,
    "fingerprint_code_loaded": "weights.fingerprint.embed" in sys.modules,
}))
"""


@pytest.mark.django_db(transaction=True)
def test_serving_a_fingerprinted_copy_imports_no_torch(
    settings, tmp_path, releases, alice, reviewer, make_submitted
) -> None:
    store = tmp_path / "store"
    settings.WEIGHTS_STORAGE, settings.WEIGHTS_LOCAL_ROOT = "local", store
    reset_storage()
    try:
        source = tmp_path / "src"
        shutil.copytree(DEMO, source)
        release = release_publish(directory=source, slug="llama-7b", transformers=False).release
        release_mark_fingerprinted(release=release)
        application = make_submitted(alice, slugs=("llama-7b",))
        reviews.application_approve(application=application, reviewer=reviewer, releases=[release])
    finally:
        reset_storage()
    [message] = [m for m in mail.outbox if "download link" in m.subject]
    token = re.search(r"/d/([A-Za-z0-9_-]{32})/", message.body).group(1)
    copy = RecipientCopy.objects.get(grant__user=alice, artifact__path=SHARD, state="ready")

    env = gunicorn_env(
        tmp_path, 8000, {"WEIGHTS_STORAGE": "local", "WEIGHTS_LOCAL_ROOT": str(store)}, 1
    )
    done = subprocess.run(  # noqa: S603 - our interpreter, our script
        [sys.executable, "-c", SCRIPT, f"/d/{token}/{SHARD}"],
        cwd=ROOT,
        env=process_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["status"] == [200, 206]
    assert served["sha256"] == copy.sha256 != copy.artifact.sha256  # the grantee's own bytes
    assert served["range_matches"] is True
    assert served["fingerprint_code_loaded"] is True
    assert served["torch"] is False
    assert hashlib.sha256(Path(DEMO / SHARD).read_bytes()).hexdigest() == copy.artifact.sha256
