"""What the fingerprinting tests share: the bundled demo model (bfloat16, two model-parallel
shards) published from a copy of its own, and the real approval that prepares a grantee's
copy and emails their link."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from django.core import mail

from access.services import reviews
from weights.models import Release
from weights.services.publishing import release_publish

DEMO = Path(__file__).resolve().parents[2] / "inference_demo" / "demo_model"


def publish_demo(
    tmp_path: Path, slug: str = "llama-7b", *, transformers: bool = False, work_dir=None
) -> Release:
    """The demo model published as ``slug`` from a copy under ``tmp_path``."""
    source = tmp_path / f"src-{slug}"
    shutil.copytree(DEMO, source)
    return release_publish(
        directory=source, slug=slug, transformers=transformers, work_dir=work_dir
    ).release


def approve(user, make_submitted, reviewer, release: Release) -> str:
    """The real approval: the task prepares the copy, then emails the link; its token."""
    sent = len(mail.outbox)
    application = make_submitted(user, slugs=(release.slug,))
    reviews.application_approve(application=application, reviewer=reviewer, releases=[release])
    [message] = [m for m in mail.outbox[sent:] if "download link" in m.subject]
    return re.search(r"/d/([A-Za-z0-9_-]{32})/", message.body).group(1)
