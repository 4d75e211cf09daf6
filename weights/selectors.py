from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Q, QuerySet, Sum

from access.models import Grant
from weights.models import Artifact, DownloadLink, LinkUsage, Release

ORIGINAL = Q(artifacts__variant=Artifact.Variant.ORIGINAL)


def catalogue() -> QuerySet[Release]:
    """Releases with the size and count of the files a download link serves (Meta's layout)."""
    return (
        Release.objects.annotate(
            total_size=Sum("artifacts__size", filter=ORIGINAL),
            file_count=Count("artifacts", filter=ORIGINAL),
        )
        .select_related("license")
        .order_by(*Release._meta.ordering)
    )  # an aggregate drops Meta.ordering


@dataclass(frozen=True)
class FileBudget:
    artifact: Artifact
    remaining_bytes: int

    @property
    def remaining_copies(self) -> float:
        return self.remaining_bytes / self.artifact.size if self.artifact.size else 0.0

    @property
    def remaining_label(self) -> str:
        """What is left, in words that read right: 1 copy, 2.5 copies, 0.25 of a copy."""
        if self.artifact.size == 0:
            return "empty file"
        if self.remaining_bytes <= 0:
            return "none left"
        copies = self.remaining_copies
        text = f"{copies:.2f}".rstrip("0").rstrip(".")
        if text == "0":
            return "less than 0.01 of a copy left"
        if copies < 1 and text != "1":
            return f"{text} of a copy left"
        return f"{text} {'copy' if text == '1' else 'copies'} left"


@dataclass(frozen=True)
class GrantDownloads:
    grant: Grant
    link: DownloadLink | None
    files: list[FileBudget]


def downloads_for(*, user: AbstractBaseUser) -> list[GrantDownloads]:
    """The user's grants, each with its live link and the budget left per file."""
    result = []
    grants = (
        Grant.objects.filter(user=user)
        .select_related("release", "license_version")
        .order_by("-created_at")
    )
    for grant in grants:
        link = grant.download_links.filter(revoked_at__isnull=True).order_by("-created_at").first()
        files: list[FileBudget] = []
        if link is not None:
            used = dict(
                LinkUsage.objects.filter(link=link).values_list("artifact_id", "bytes_charged")
            )
            files = [
                FileBudget(
                    artifact=a,
                    remaining_bytes=max(0, link.budget_copies * a.size - used.get(a.pk, 0)),
                )
                for a in grant.release.artifacts.filter(variant=Artifact.Variant.ORIGINAL)
            ]
        result.append(GrantDownloads(grant=grant, link=link, files=files))
    return result
