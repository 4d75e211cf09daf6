"""The body of /d/<token>/manifest.json, for a link whose token is at hand.

The API hands it out with a fresh link (weights.api), so a script needs no second
request; tests compare it with what the live manifest.json answers, field for field.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.urls import reverse

from weights.models import Artifact, DownloadLink, LinkUsage
from weights.services.budget import budget_limit
from weights.services.file_requests import LINK_VARIANT
from weights.services.fingerprinting import served_checksums


def link_files(link: DownloadLink) -> list[Artifact]:
    """The files a link URL serves, as manifest.json lists them."""
    return list(link.grant.release.artifacts.filter(variant=LINK_VARIANT).order_by("path"))


@dataclass(frozen=True)
class FileRow:
    """A file of the link, its URL on the link and the budget left for it."""

    artifact: Artifact
    url: str
    remaining_bytes: int
    sha256: str  # the grantee's own in a fingerprinted release, else the published one
    md5: str

    @property
    def size_human(self) -> str:
        return filesizeformat(self.artifact.size)


def file_rows(request: HttpRequest, link: DownloadLink, token: str) -> list[FileRow]:
    """What the landing page and manifest.json list: one query for the charges."""
    charged = dict(LinkUsage.objects.filter(link=link).values_list("artifact_id", "bytes_charged"))
    rows = []
    for artifact, (sha256, md5) in served_checksums(link.grant, link_files(link)):
        rows.append(
            FileRow(
                artifact=artifact,
                url=request.build_absolute_uri(
                    reverse("weights:file", args=[token, artifact.path])
                ),
                remaining_bytes=max(0, budget_limit(link, artifact) - charged.get(artifact.pk, 0)),
                sha256=sha256,
                md5=md5,
            )
        )
    return rows


def manifest_body(request: HttpRequest, link: DownloadLink, token: str) -> dict:
    release = link.grant.release
    files = [
        {
            "path": row.artifact.path,
            "size": row.artifact.size,
            "sha256": row.sha256,
            "md5": row.md5,
            "url": row.url,
            "remaining_bytes": row.remaining_bytes,
        }
        for row in file_rows(request, link, token)
    ]
    return {
        "release": release.slug,
        "name": release.name,
        "expires_at": link.expires_at.isoformat(),
        "budget_copies": link.budget_copies,
        "files": files,
    }
