"""The body of /d/<token>/manifest.json, for a link whose token is at hand.

The API hands it out with a fresh link (weights.api), so a script needs no second
request; tests compare it with what the live manifest.json answers, field for field.
"""

from __future__ import annotations

from django.http import HttpRequest
from django.urls import reverse

from weights.models import Artifact, DownloadLink, LinkUsage
from weights.services.budget import budget_limit
from weights.services.file_requests import LINK_VARIANT


def link_files(link: DownloadLink) -> list[Artifact]:
    """The files a link URL serves, as manifest.json lists them."""
    return list(link.grant.release.artifacts.filter(variant=LINK_VARIANT).order_by("path"))


def manifest_body(request: HttpRequest, link: DownloadLink, token: str) -> dict:
    charged = dict(LinkUsage.objects.filter(link=link).values_list("artifact_id", "bytes_charged"))
    release = link.grant.release
    files = [
        {
            "path": artifact.path,
            "size": artifact.size,
            "sha256": artifact.sha256,
            "md5": artifact.md5,
            "url": request.build_absolute_uri(reverse("weights:file", args=[token, artifact.path])),
            "remaining_bytes": max(0, budget_limit(link, artifact) - charged.get(artifact.pk, 0)),
        }
        for artifact in link_files(link)
    ]
    return {
        "release": release.slug,
        "name": release.name,
        "expires_at": link.expires_at.isoformat(),
        "budget_copies": link.budget_copies,
        "files": files,
    }
