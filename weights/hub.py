"""The Hugging Face Hub protocol: `HF_ENDPOINT=<portal>` with a portal API token as the HF
token, and `hf download`, `snapshot_download`, `hf_hub_download` and transformers'
`from_pretrained` work unmodified against a granted release.

    GET  /api/models/<ns>/<slug>[/revision/<rev>]      repo info: sha, siblings, gated
    GET  /api/models/<ns>/<slug>/tree/<rev>[/<path>]   a folder's entries
    GET  /api/whoami-v2                                who the token belongs to
    HEAD|GET /<ns>/<slug>/resolve/<rev>/<path>         a file (Range, 302 to S3)

Repo info is public, as a gated repo's is on the Hub; files need a grant. In a
fingerprinted release the listings (siblings, tree) name the bytes the caller receives: a
grantee's own SHA-256 for each file that differs per recipient; for anyone else, or while
the grantee's copy is prepared, that file's size and no `lfs`. Each grantee there sees a
commit of their own, so grantees sharing one HF cache keep their own copies. A file request
goes through weights.serving.deliver, the same checks, budget, events and serving as a
/d/<token>/ link; only the errors differ: the headers the client turns into
RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError and GatedRepoError.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions

from access.authentication import ApiTokenAuthentication
from access.models import ApiToken
from portal.text import one_line
from weights.models import Artifact, Release
from weights.refusals import Refusal, quiet, safe_methods
from weights.services import fingerprinting
from weights.services.hub_access import (
    BAD_TOKEN,
    BadCredentials,
    EntryNotFound,
    HubRefused,
    caller_grant,
    hub_link,
    repo_file,
    repo_files,
    repo_id,
    repo_release,
    revision_check,
)
from weights.serving import Door, Visit, deliver

HUB_BAD_CREDENTIALS = "Invalid credentials in Authorization header"
FOLDER_NOT_FOUND = "{path} is not a folder of {repo}."
LFS_POINTER_SIZE = 134  # what the Hub reports for a Git LFS pointer file


@dataclass(frozen=True)
class _Caller:
    """The API token's user, or anonymous; a bad token is a refusal, never anonymous."""

    user: AbstractBaseUser | AnonymousUser
    token: ApiToken | None


def _caller(request: HttpRequest) -> _Caller:
    try:
        found = ApiTokenAuthentication().authenticate(request)
    except exceptions.AuthenticationFailed as error:
        raise BadCredentials(
            f"{error.detail} {BAD_TOKEN.format(url=_tokens_url(request))}"
        ) from None
    if found is None:
        return _Caller(AnonymousUser(), None)
    return _Caller(*found)


def _tokens_url(request: HttpRequest) -> str:
    return request.build_absolute_uri("/account/api-tokens/")


def _hub_error(request: HttpRequest, error: HubRefused) -> HttpResponse:
    # The client reads a 401 from /api/models/ as "repository not found" unless it carries
    # the Hub's own words for a bad token; our message is then in the body. A file request
    # (HEAD first: no body) gets our message in the header.
    header = (
        HUB_BAD_CREDENTIALS
        if isinstance(error, BadCredentials) and request.path.startswith("/api/")
        else None
    )
    return _error_response(error.status, error.error_code, str(error), header=header)


def _error_response(
    status: int, error_code: str, message: str, *, header: str | None = None
) -> HttpResponse:
    """The portal's API envelope, plus what huggingface_hub reads: `error` and the
    X-Error-Code / X-Error-Message headers (HEAD responses have no body)."""
    message = one_line(message)
    code = error_code or ("invalid_token" if status == 401 else "refused")
    response = JsonResponse(
        {"detail": message, "code": code, "errors": {}, "error": message}, status=status
    )
    if error_code:
        response["X-Error-Code"] = error_code
    response["X-Error-Message"] = header or message.encode("ascii", "replace").decode("ascii")
    return quiet(response)


def _hub_refusal(commit: str):
    """A refusal of the shared file path, as the Hub client reads it."""

    def refuse(request: HttpRequest, refusal: Refusal) -> HttpResponse:
        code = "GatedRepo" if refusal.status in (401, 403) else ""
        if refusal.code == "not_found":
            code = "EntryNotFound"
        response = _error_response(refusal.status, code, refusal.message)
        response["X-Repo-Commit"] = commit
        return response

    return refuse


def _hub_timestamp(value: datetime | None) -> str:
    value = (value or datetime.now(UTC)).astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _listing(
    release: Release, user: AbstractBaseUser | AnonymousUser
) -> list[tuple[Artifact, str]]:
    """Each file with the SHA-256 of the bytes this caller receives, "" where there are none
    to name: in a fingerprinted release a grantee's own copy's, and nothing for a file that
    differs per recipient while their copy is being prepared (resolve answers 503 until
    then) or when the caller has no grant. Nobody receives the original's bytes, and its
    checksum is the one value that identifies them, so it is never listed."""
    files = repo_files(release)
    if not release.fingerprinted:
        return [(a, a.sha256) for a in files]
    grant = caller_grant(user, release)
    if grant is not None:
        return [(a, sha) for a, (sha, _md5) in fingerprinting.served_checksums(grant, files)]
    return [(a, "" if fingerprinting.differs_in(release, a) else a.sha256) for a in files]


def _blob_id(artifact: Artifact, sha256: str, commit: str) -> str:
    """A stable 40-hex id per file content, where the Hub gives the git blob's. Content we
    do not name gets an id of its path at this commit: the tree needs one, and it must not
    be derived from the original's checksum."""
    seed = sha256 or f"{commit}\0{artifact.repo_path}\0own-copy"
    return hashlib.sha1(seed.encode(), usedforsecurity=False).hexdigest()


def _lfs(artifact: Artifact, sha256: str, key: str) -> dict:
    """The `lfs` member of a listing, or none: huggingface_hub reads a file without it as
    a plain git file (RepoSibling.lfs / RepoFile.lfs None) and downloads it all the same."""
    if not sha256:
        return {}
    return {"lfs": {key: sha256, "size": artifact.size, "pointerSize": LFS_POINTER_SIZE}}


def _sibling(artifact: Artifact, sha256: str, commit: str) -> dict:
    return {
        "rfilename": artifact.repo_path,
        "size": artifact.size,  # a grantee's copy has the original's length
        "blobId": _blob_id(artifact, sha256, commit),
        **_lfs(artifact, sha256, "sha256"),
    }


def _model_info(release: Release, commit: str, listing: list[tuple[Artifact, str]]) -> dict:
    files = [a for a, _sha in listing]
    has_transformers = any(a.variant == Artifact.Variant.TRANSFORMERS for a in files)
    namespace = repo_id(release).split("/")[0]
    return {
        "_id": f"release-{release.pk}",
        "id": repo_id(release),
        "modelId": repo_id(release),
        "author": namespace,
        # The caller's commit, as `resolve`'s X-Repo-Commit: a grantee of a fingerprinted
        # release has one of their own (hub_access.caller_commit).
        "sha": commit,
        "lastModified": _hub_timestamp(release.published_at),
        "createdAt": _hub_timestamp(release.created_at),
        "private": False,
        "disabled": False,
        "gated": "manual",
        "downloads": 0,
        "likes": 0,
        "library_name": "transformers" if has_transformers else None,
        "pipeline_tag": "text-generation",
        "tags": [release.family, "text-generation"]
        + (["transformers"] if has_transformers else []),
        "cardData": {"license": "other", "license_name": "noncommercial research license"},
        "usedStorage": sum(a.size for a in files),
        "siblings": [_sibling(a, sha, commit) for a, sha in listing],
    }


@safe_methods
def model_info(request: HttpRequest, namespace: str, name: str, revision: str = "main"):
    try:
        caller = _caller(request)  # public, but a bad token is still refused
        release = repo_release(namespace, name)
        commit = revision_check(release, revision, caller.user)
    except HubRefused as error:
        return _hub_error(request, error)
    return JsonResponse(_model_info(release, commit, _listing(release, caller.user)))


@safe_methods
def tree(request: HttpRequest, namespace: str, name: str, revision: str, path: str = ""):
    try:
        caller = _caller(request)
        release = repo_release(namespace, name)
        commit = revision_check(release, revision, caller.user)
    except HubRefused as error:
        return _hub_error(request, error)
    folder = path.strip("/")
    recursive = request.GET.get("recursive", "").lower() in ("1", "true")
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict] = {}
    for artifact, sha256 in _listing(release, caller.user):
        if not artifact.repo_path.startswith(prefix):
            continue
        rest = artifact.repo_path.removeprefix(prefix)
        parts = rest.split("/")
        # Each folder above the file, down to this listing's depth, is an entry of its own.
        for depth in range(1, len(parts)):
            if depth > 1 and not recursive:
                break
            folder_path = prefix + "/".join(parts[:depth])
            entries.setdefault(
                folder_path,
                {"type": "directory", "oid": _tree_id(folder_path, commit), "path": folder_path},
            )
        if len(parts) == 1 or recursive:
            entries[artifact.repo_path] = {
                "type": "file",
                "oid": _blob_id(artifact, sha256, commit),
                "size": artifact.size,
                "path": artifact.repo_path,
                **_lfs(artifact, sha256, "oid"),
            }
    if folder and not entries:
        return _hub_error(
            request, EntryNotFound(FOLDER_NOT_FOUND.format(path=folder, repo=repo_id(release)))
        )
    return JsonResponse([entries[key] for key in sorted(entries)], safe=False)


def _tree_id(path: str, commit: str) -> str:
    return hashlib.sha1(f"{commit}\0{path}".encode(), usedforsecurity=False).hexdigest()


@safe_methods
def whoami(request: HttpRequest) -> HttpResponse:
    try:
        caller = _caller(request)
    except HubRefused as error:
        return _hub_error(request, error)
    if caller.token is None:
        message = f"Send a portal API token. {BAD_TOKEN.format(url=_tokens_url(request))}"
        return _error_response(401, "", message, header=HUB_BAD_CREDENTIALS)
    user = caller.user
    return JsonResponse(
        {
            "type": "user",
            "id": str(user.pk),
            "name": user.get_username(),
            "fullname": user.get_full_name() or user.get_username(),
            "email": user.email,
            "emailVerified": True,
            "isPro": False,
            "orgs": [],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": caller.token.name, "role": "read"},
            },
        }
    )


@safe_methods
def resolve(request: HttpRequest, namespace: str, name: str, revision: str, path: str):
    visit = Visit.of(request)
    try:
        caller = _caller(request)
        release = repo_release(namespace, name)
        commit = revision_check(release, revision, caller.user)
        artifact = repo_file(release, path, commit)
    except HubRefused as error:
        return _hub_error(request, error)
    try:
        link = hub_link(caller.user, release)
    except HubRefused as error:
        if error.refusal is not None:  # the grant's link refused: the audit row a link writes
            outcome = Refusal.from_error(error.refusal).outcome
            visit.record(
                link=error.link, artifact=artifact, nbytes=0, status=error.status, outcome=outcome
            )
        response = _hub_error(request, error)
        response["X-Repo-Commit"] = commit
        return response
    etag = f'"{artifact.sha256}"'
    if fingerprinting.is_own_copy(link.grant, artifact):  # the grantee's own bytes
        copy = fingerprinting.served_copy(link.grant, artifact)
        etag = f'"{copy.sha256}"' if copy else etag  # deliver() refuses until it is ready
    door = Door(
        refuse=_hub_refusal(commit),
        headers={
            "X-Repo-Commit": commit,
            "X-Linked-Etag": etag,
            "X-Linked-Size": str(artifact.size),
        },
    )
    return deliver(request, visit, link, artifact, door)
