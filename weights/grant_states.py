"""A researcher's grants as the API shows them: the release's files, and the grant's
latest download link with what is left of its budget per file. Never a token.

A few queries for all of a user's grants, however many links each has had.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import OuterRef, Prefetch, Subquery
from django.utils import timezone

from access.models import Grant
from weights.models import Artifact, DownloadLink, LinkUsage
from weights.services.budget import budget_limit

LIVE, EXPIRED, REVOKED = "live", "expired", "revoked"


@dataclass(frozen=True)
class LinkFile:
    artifact: Artifact
    remaining_bytes: int

    @property
    def path(self) -> str:
        return self.artifact.path

    @property
    def variant(self) -> str:
        return self.artifact.variant


@dataclass(frozen=True)
class LinkState:
    link: DownloadLink
    state: str  # LIVE, EXPIRED or REVOKED
    files: list[LinkFile]


@dataclass(frozen=True)
class GrantState:
    grant: Grant
    files: list[Artifact]
    link: LinkState | None  # None: no link was ever issued


def _state(link: DownloadLink, now: datetime) -> str:
    if link.revoked_at is not None:
        return REVOKED
    return EXPIRED if link.is_expired(now) else LIVE


def _remaining(
    link: DownloadLink, artifact: Artifact, state: str, charged: dict[tuple[int, int], int]
) -> int:
    """What the link may still fetch of the file; nothing once it no longer works."""
    if state != LIVE:
        return 0
    return max(0, budget_limit(link, artifact) - charged.get((link.pk, artifact.pk), 0))


def grant_states(grants) -> list[GrantState]:
    latest = DownloadLink.objects.filter(grant=OuterRef("pk")).order_by("-created_at", "-pk")
    grants = list(
        grants.select_related("release", "license_version")
        .prefetch_related(
            Prefetch("release__artifacts", queryset=Artifact.objects.order_by("variant", "path"))
        )
        .annotate(latest_link_id=Subquery(latest.values("pk")[:1]))
    )
    links = DownloadLink.objects.in_bulk([g.latest_link_id for g in grants if g.latest_link_id])
    charged: dict[tuple[int, int], int] = {
        (link_id, artifact_id): nbytes
        for link_id, artifact_id, nbytes in LinkUsage.objects.filter(
            link_id__in=list(links)
        ).values_list("link_id", "artifact_id", "bytes_charged")
    }
    now = timezone.now()
    states = []
    for grant in grants:
        files = list(grant.release.artifacts.all())
        link = links.get(grant.latest_link_id)
        link_state = None
        if link is not None:
            state = _state(link, now)
            link_state = LinkState(
                link=link,
                state=state,
                files=[
                    LinkFile(artifact, _remaining(link, artifact, state, charged))
                    for artifact in files
                ],
            )
        states.append(GrantState(grant=grant, files=files, link=link_state))
    return states


def grant_states_for(*, user: AbstractBaseUser) -> list[GrantState]:
    """The user's grants, newest first, revoked ones included."""
    return grant_states(Grant.objects.filter(user=user).order_by("-created_at", "-pk"))


def grant_state_for(*, user: AbstractBaseUser, grant_id: int) -> GrantState | None:
    states = grant_states(Grant.objects.filter(user=user, pk=grant_id))
    return states[0] if states else None
