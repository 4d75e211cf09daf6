"""The Hugging Face Hub door's rules: which release a repo names, at which revision, which
file a repo path is, and the link a grantee's API token downloads through.

Nothing here is a second copy of the access rules. Who may use a release is
access.policies.can_use_release (as for the demo); the link is then checked by
links.link_check and charged by the budget, exactly as a /d/<token>/ request is.

A grantee downloading through the Hub uses the grant's live link, so the Hub and the
emailed link share one budget. When that link has expired (or the expiry sweep closed
it), the Hub door issues a fresh one, not emailed: the API token, which has its own
expiry, is the credential here. A link a reviewer revoked stays revoked for both doors.
"""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.utils import timezone

from access.models import Grant
from access.policies import can_use_release
from weights.models import Artifact, DownloadLink, Release
from weights.services.links import (
    EXPIRED_REASON,
    REPLACED_REASON,
    LinkRefused,
    link_check,
    link_issue,
    links_with_access_facts,
)

REPO_NOT_FOUND = "Repository {repo} not found. Releases are listed at {url}."
REVISION_NOT_FOUND = (
    "Revision {revision} not found in {repo}: its files changed since. Use 'main' or {current}."
)
ENTRY_NOT_FOUND = "{path} is not a file of {repo} at revision {revision}."
SIGN_IN = (
    "Access to {repo} is restricted: send a portal API token as the Hugging Face token "
    "(HF_TOKEN or --token). Create one at {url}."
)
BAD_TOKEN = "Your API token is invalid, expired or revoked; create a new one at {url}."


class HubRefused(Exception):
    """A Hub protocol refusal: its HTTP status and the X-Error-Code the client knows."""

    status = 404
    error_code = ""

    def __init__(
        self,
        message: str,
        *,
        link: DownloadLink | None = None,
        refusal: LinkRefused | None = None,
    ) -> None:
        super().__init__(message)
        self.link, self.refusal = link, refusal


class RepoNotFound(HubRefused):
    error_code = "RepoNotFound"


class RevisionNotFound(HubRefused):
    error_code = "RevisionNotFound"


class EntryNotFound(HubRefused):
    error_code = "EntryNotFound"


class GatedRepo(HubRefused):
    status = 403
    error_code = "GatedRepo"


class SignInRequired(GatedRepo):
    status = 401


class BadCredentials(HubRefused):
    status = 401
    # What the Hub itself says, so that the client does not read it as "repository not found".
    error_code = ""


def repo_id(release: Release) -> str:
    return f"{settings.WEIGHTS_HUB_NAMESPACE}/{release.slug}"


def repo_release(namespace: str, name: str) -> Release:
    """The published release a repo id names."""
    repo = f"{namespace}/{name}"
    release = None
    if namespace == settings.WEIGHTS_HUB_NAMESPACE:
        release = Release.objects.filter(slug=name, published_at__isnull=False).first()
    if release is None:
        raise RepoNotFound(REPO_NOT_FOUND.format(repo=repo, url=_site("/api/releases/")))
    return release


def revision_check(
    release: Release, revision: str, user: AbstractBaseUser | AnonymousUser | None = None
) -> str:
    """The commit a revision names for this caller: 'main', the release's current revision
    or the caller's own commit of it (``caller_commit``)."""
    own = caller_commit(release, user)
    if revision in ("main", release.revision, own) and release.revision:
        return own
    raise RevisionNotFound(
        REVISION_NOT_FOUND.format(
            revision=revision, repo=repo_id(release), current=release.revision
        )
    )


def repo_files(release: Release) -> list[Artifact]:
    """The release's files in repo order (the Hub layout: transformers at the top, Meta's
    files under original/)."""
    return sorted(release.artifacts.all(), key=lambda a: a.repo_path)


def repo_file(release: Release, path: str, commit: str) -> Artifact:
    if path.startswith("original/"):
        variant, inner = Artifact.Variant.ORIGINAL, path.removeprefix("original/")
    else:
        variant, inner = Artifact.Variant.TRANSFORMERS, path
    artifact = release.artifacts.filter(variant=variant, path=inner).first()
    if artifact is None:
        raise EntryNotFound(
            ENTRY_NOT_FOUND.format(path=path, repo=repo_id(release), revision=commit)
        )
    return artifact


def caller_grant(user: AbstractBaseUser | AnonymousUser, release: Release) -> Grant | None:
    """The user's live grant of `release`: whose bytes the Hub door serves and lists."""
    if not user.is_authenticated:
        return None
    live = Grant.objects.filter(user=user, release=release, revoked_at__isnull=True)
    return live.select_related("release").first()


def caller_commit(release: Release, user: AbstractBaseUser | AnonymousUser | None) -> str:
    """The commit this caller is shown: the release's revision, except for a grantee of a
    fingerprinted release, whose bytes are their own. huggingface_hub keeps one file per
    (commit, path) in its cache, so two grantees sharing a cache (a lab's HF_HOME) would
    otherwise be handed whichever copy came first."""
    if not release.fingerprinted or user is None or not release.revision:
        return release.revision
    grant = caller_grant(user, release)
    if grant is None:
        return release.revision
    seed = f"{release.revision}\0grant {grant.pk}"
    return hashlib.sha1(seed.encode(), usedforsecurity=False).hexdigest()


def hub_link(user: AbstractBaseUser | AnonymousUser, release: Release) -> DownloadLink:
    """The checked link `user` downloads `release` through; raises GatedRepo saying why not
    (with the link's own refusal as `refusal` when the grant has a link)."""
    if not user.is_authenticated:
        raise SignInRequired(
            SIGN_IN.format(repo=repo_id(release), url=_site("/account/api-tokens/"))
        )
    grant = caller_grant(user, release)
    if grant is None:
        decision = can_use_release(user, release)  # says why: pending, revoked, none
        raise GatedRepo(_with_action(decision.message, decision.action_url))
    link = links_with_access_facts().filter(grant=grant).order_by("-created_at", "-pk").first()
    if link is None or _lapsed(link):
        issued = link_issue(grant=grant)
        link = links_with_access_facts().get(pk=issued.link.pk)
    try:
        link_check(link, in_flight=False)
    except LinkRefused as error:
        raise GatedRepo(
            _with_action(str(error), error.action_url), link=link, refusal=error
        ) from error
    return link


def _with_action(message: str, action_url: str) -> str:
    return f"{message} {_site(action_url)}" if action_url else message


def _lapsed(link: DownloadLink) -> bool:
    """Expired, or closed by the expiry sweep or by a newer link: not a person's revocation."""
    if link.revoked_at is None:
        return link.is_expired(timezone.now())
    return link.revoke_reason in (EXPIRED_REASON, REPLACED_REASON)


def _site(path: str) -> str:
    return settings.SITE_URL + path
