"""Download link endpoints: /d/<token>/ (landing), manifest.json, download.sh and the files.

Every request re-resolves the token (expiry, revocation, grant, license). Only file
bodies cost budget, and only the bytes sent (local) or authorised (S3, X-Accel).
Rules live in weights.services.links; Range parsing in weights.ranges; refusal
pages in weights.refusals.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from django.conf import settings
from django.core.cache import cache
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.http import content_disposition_header

from portal.csp_middleware import FILE_POLICY
from portal.http import client_ip, user_agent
from portal.text import one_line
from weights.checksums import CHECKLIST_NAMES
from weights.manifests import file_rows, link_files, manifest_body
from weights.models import Artifact, DownloadEvent, DownloadLink
from weights.paths import artifact_path_ok
from weights.ranges import ByteRange, Unsatisfiable, etag_matches, if_range_allows, parse_range
from weights.refusals import (
    Refusal,
    bad_range,
    not_found,
    preparing,
    protect,
    refusal_response,
    safe_methods,
    unavailable,
)
from weights.services import fingerprinting
from weights.services.budget import (
    FlowingCharge,
    authorise,
    budget_spent_error,
    refund,
)
from weights.services.events import download_event_record
from weights.services.file_requests import LINK_VARIANT, link_file_resolve
from weights.services.links import LinkRefused, link_recheck, link_resolve
from weights.storage import StorageError, get_storage

logger = logging.getLogger("weights.serving")

Outcome = DownloadEvent.Outcome
CHUNK_SIZE = 1024 * 1024
# A running local stream re-checks its link (revocation, grant, license) this often, so a
# revoked link stops a 13 GB shard within seconds, not at its end.
RECHECK_SECONDS = 5.0
RECHECK_BYTES = 64 * 1024 * 1024
FILE_CACHE = "private"  # a browser may keep the bytes; shared caches may not


# --- landing page, manifest, download.sh: no budget, no download events -------------------


def _resolve_page(request: HttpRequest, token: str, *, as_json: bool | None = None):
    try:
        return link_resolve(token), None
    except LinkRefused as error:
        return None, refusal_response(request, Refusal.from_error(error), as_json=as_json)


def _resolve_listing(request: HttpRequest, token: str, *, as_json: bool | None = None):
    """As _resolve_page, for what lists checksums (manifest.json, download.sh, llama-stack):
    a grantee's own copy must be prepared first, or the checksums would be wrong."""
    link, refused = _resolve_page(request, token, as_json=as_json)
    if refused or fingerprinting.copies_ready(link.grant):
        return link, refused
    message = fingerprinting.PREPARING.format(release=link.grant.release)
    response = refusal_response(request, preparing(message), as_json=as_json)
    response["Retry-After"] = "60"
    return None, response


@safe_methods
def landing(request: HttpRequest, token: str) -> HttpResponse:
    link, refused = _resolve_page(request, token)
    if refused:
        return refused
    landing_url = request.build_absolute_uri(reverse("weights:landing", args=[token]))
    rows = file_rows(request, link, token)
    context = {
        "link": link,
        "release": link.grant.release,
        "files": rows,
        "preparing": not fingerprinting.copies_ready(link.grant),
        "total_size": sum(row.artifact.size for row in rows),
        "landing_url": landing_url,
        "cli_command": f'python -m weights.download "{landing_url}"',
        "script_url": reverse("weights:download_script", args=[token]),
        "manifest_url": reverse("weights:manifest", args=[token]),
        "llama_stack_url": reverse("weights:llama_stack_manifest", args=[token]),
        "hub_repo": f"{settings.WEIGHTS_HUB_NAMESPACE}/{link.grant.release.slug}",
        "site_url": request.build_absolute_uri("/").rstrip("/"),
        "tokens_url": reverse("access:api_tokens"),
        "downloads_url": reverse("weights:my_downloads"),
    }
    return protect(render(request, "weights/landing.html", context))


@safe_methods
def manifest(request: HttpRequest, token: str) -> HttpResponse:
    link, refused = _resolve_listing(request, token, as_json=True)
    if refused:
        return refused
    return protect(JsonResponse(manifest_body(request, link, token)))


@safe_methods
def llama_stack_manifest(request: HttpRequest, token: str) -> HttpResponse:
    """The link's files in the shape Meta's own tool reads:
    `llama download --source meta --manifest-file llama-stack.json`."""
    link, refused = _resolve_listing(request, token, as_json=True)
    if refused:
        return refused
    release = link.grant.release
    # llama-stack compares expires_on with a naive datetime.now(): an aware value would
    # make it crash, so this is naive UTC (early by the user's offset east of UTC, never late).
    expires_on = link.expires_at.astimezone(UTC).replace(tzinfo=None, microsecond=0)
    body = {
        "models": [
            {
                "model_id": release.slug,
                "files": {row.artifact.path: row.url for row in file_rows(request, link, token)},
            }
        ],
        "expires_on": expires_on.isoformat(),
    }
    response = JsonResponse(body)
    response["Content-Disposition"] = content_disposition_header(True, "llama-stack.json")
    return protect(response)


@safe_methods
def download_script(request: HttpRequest, token: str) -> HttpResponse:
    link, refused = _resolve_listing(request, token)
    if refused:
        return refused
    release = link.grant.release
    base = request.build_absolute_uri(reverse("weights:landing", args=[token]))
    # The file endpoint would refuse any other path, so the script never asks for one.
    artifacts = [a for a in link_files(link) if artifact_path_ok(a.path)]
    checksums = dict(
        (a.pk, sums) for a, sums in fingerprinting.served_checksums(link.grant, artifacts)
    )
    title = one_line(release.name)
    # Every value reaches sh as a single-quoted word, and every path as ./path, so no name
    # can run a command or pass for an option. The comment lines get a one-line title.
    context = {
        "title_comment": title,
        "title": shlex.quote(title),
        "link": link,
        "presigned_url": shlex.quote(base + "*"),
        "files": [
            (shlex.quote(quote(a.path)), shlex.quote("./" + a.path), a.size) for a in artifacts
        ],
        # Each line starts with 64 hex digits, so none can end the here-document early.
        "sha256_lines": [f"{checksums[a.pk][0]}  ./{a.path}" for a in artifacts],
        "sums_name": shlex.quote(f"{release.slug}.sha256"),
        "checklists": [
            shlex.quote("./" + a.path)
            for a in artifacts
            if posixpath.basename(a.path) in CHECKLIST_NAMES
        ],
    }
    response = HttpResponse(
        render_to_string("weights/download.sh", context), content_type="text/x-shellscript"
    )
    response["Content-Disposition"] = content_disposition_header(True, "download.sh")
    return protect(response)


# --- files -------------------------------------------------------------------------------


def _artifact_for(link: DownloadLink, path: str) -> Artifact | None:
    """The file at `path` in the link's own release, or None."""
    if not artifact_path_ok(path):
        return None
    return Artifact.objects.filter(
        release_id=link.grant.release_id, variant=LINK_VARIANT, path=path
    ).first()


@dataclass(frozen=True)
class Visit:
    """Who asked for what, for the DownloadEvent every file request records."""

    ip_address: str | None
    user_agent: str
    range_header: str

    @classmethod
    def of(cls, request: HttpRequest) -> Visit:
        return cls(
            ip_address=client_ip(request),
            user_agent=user_agent(request),
            range_header=request.headers.get("Range", ""),
        )

    def record(
        self,
        *,
        link: DownloadLink | None,
        artifact: Artifact | None,
        nbytes: int,
        status: int,
        outcome: str,
    ) -> None:
        download_event_record(
            link=link,
            user=link.grant.user if link else None,
            artifact=artifact,
            ip_address=self.ip_address,
            user_agent=self.user_agent,
            range_header=self.range_header,
            nbytes=nbytes,
            status_code=status,
            outcome=outcome,
        )


@dataclass(frozen=True)
class Door:
    """What differs between the front doors to the same file (a link URL, the Hub protocol):
    how a refusal reads, and the headers a door adds to every file response. Everything
    else (checks, budget, events, serving) is `deliver`, the same for every door."""

    refuse: Callable[[HttpRequest, Refusal], HttpResponse] = refusal_response
    headers: Mapping[str, str] = field(default_factory=dict)


LINK_DOOR = Door()


def _refuse_file(
    request: HttpRequest,
    visit: Visit,
    refusal: Refusal,
    *,
    link: DownloadLink | None,
    artifact: Artifact | None,
    door: Door = LINK_DOOR,
) -> HttpResponse:
    visit.record(
        link=link, artifact=artifact, nbytes=0, status=refusal.status, outcome=refusal.outcome
    )
    return door.refuse(request, refusal)


@safe_methods
def file(request: HttpRequest, token: str, path: str) -> HttpResponse:
    visit = Visit.of(request)
    try:
        link, artifact = link_file_resolve(token, path)
    except LinkRefused as error:
        artifact = _artifact_for(error.link, path) if error.link else None
        return _refuse_file(
            request, visit, Refusal.from_error(error), link=error.link, artifact=artifact
        )
    if artifact is None:
        return _refuse_file(request, visit, not_found(), link=link, artifact=None)
    return deliver(request, visit, link, artifact)


def deliver(
    request: HttpRequest,
    visit: Visit,
    link: DownloadLink,
    artifact: Artifact,
    door: Door = LINK_DOOR,
) -> HttpResponse:
    """Serve `artifact` on `link`, which the caller's door has resolved and checked: HEAD,
    conditional and range requests, the budget, the event, and the bytes from local
    storage, nginx (X-Accel) or S3 (a presigned redirect). In a fingerprinted release a
    weight file is the grantee's own copy: its checksum is the ETag, and its bytes are
    either written to storage under a key of its own (then served as any stored file) or
    computed and streamed by the portal."""
    own = fingerprinting.is_own_copy(link.grant, artifact)
    key = artifact.storage_key
    if own:
        copy = fingerprinting.served_copy(link.grant, artifact)
        if copy is None:
            message = fingerprinting.PREPARING.format(release=link.grant.release)
            refused = _refuse_file(
                request, visit, preparing(message), link=link, artifact=artifact, door=door
            )
            refused["Retry-After"] = "60"
            return refused
        etag, key = f'"{copy.sha256}"', copy.storage_key
    else:
        etag = f'"{artifact.sha256}"'
    if request.method == "HEAD":  # Range does not apply to HEAD; nothing is charged
        visit.record(link=link, artifact=artifact, nbytes=0, status=200, outcome=Outcome.HEAD)
        return _file_headers(HttpResponse(), artifact, etag, artifact.size, door)
    if etag_matches(request.headers.get("If-None-Match"), etag):
        visit.record(
            link=link, artifact=artifact, nbytes=0, status=304, outcome=Outcome.NOT_MODIFIED
        )
        return _file_headers(HttpResponse(status=304), artifact, etag, None, door)
    try:
        allowed = if_range_allows(request.headers.get("If-Range"), etag)
        byte_range = parse_range(visit.range_header if allowed else None, artifact.size)
    except Unsatisfiable:
        visit.record(link=link, artifact=artifact, nbytes=0, status=416, outcome=Outcome.BAD_RANGE)
        response = door.refuse(request, bad_range(artifact.size))
        response["Content-Range"] = f"bytes */{artifact.size}"
        return response

    if own and not key:  # computed per request: neither nginx nor S3 holds these bytes
        return _serve_local(request, visit, None, link, artifact, byte_range, etag, door, own=own)
    storage = get_storage()
    try:
        local = storage.local_path(key)
    except StorageError:
        logger.exception("artifact %s has an unusable storage key", artifact.pk)
        return _refuse_file(request, visit, unavailable(), link=link, artifact=artifact, door=door)
    if local is None:
        return _serve_redirect(request, visit, storage, link, artifact, key, byte_range, door)
    if settings.WEIGHTS_X_ACCEL_PREFIX:
        return _serve_accel(request, visit, link, artifact, key, byte_range, etag, door)
    return _serve_local(request, visit, local, link, artifact, byte_range, etag, door)


def _file_headers(
    response: HttpResponse, artifact: Artifact, etag: str, length: int | None, door: Door
) -> HttpResponse:
    response["ETag"] = etag
    response["Accept-Ranges"] = "bytes"
    response["Content-Type"] = "application/octet-stream"
    response["Content-Disposition"] = content_disposition_header(
        True, posixpath.basename(artifact.path)
    )
    if length is not None:
        response["Content-Length"] = str(length)
    response["Content-Security-Policy"] = FILE_POLICY
    for name, value in door.headers.items():
        response[name] = value
    return protect(response, cache=FILE_CACHE)


def _refuse_budget(
    request: HttpRequest, visit: Visit, link: DownloadLink, artifact: Artifact, door: Door
) -> HttpResponse:
    refusal = Refusal.from_error(budget_spent_error(link, artifact))
    return _refuse_file(request, visit, refusal, link=link, artifact=artifact, door=door)


def _serve_local(
    request: HttpRequest,
    visit: Visit,
    local: Path | None,
    link: DownloadLink,
    artifact: Artifact,
    byte_range: ByteRange | None,
    etag: str,
    door: Door,
    *,
    own: bool = False,
) -> HttpResponse:
    start, length = (byte_range.start, byte_range.length) if byte_range else (0, artifact.size)
    try:
        handle = fingerprinting.open_copy(link.grant, artifact) if own else local.open("rb")
    except (OSError, StorageError, fingerprinting.FingerprintRefused):
        logger.exception("artifact %s is missing from local storage", artifact.pk)
        return _refuse_file(request, visit, unavailable(), link=link, artifact=artifact, door=door)
    flow = FlowingCharge.begin(
        link=link, artifact=artifact, address=visit.ip_address, start=start, length=length
    )
    if flow is None:
        handle.close()
        return _refuse_budget(request, visit, link, artifact, door)
    status = 206 if byte_range else 200
    stream = MeteredStream(
        handle,
        flow,
        on_close=_record_stream(visit, link, artifact, status, length),
        recheck=lambda: link_recheck(link_id=link.pk),
    )
    response = StreamingHttpResponse(stream, status=status)
    if byte_range:
        response["Content-Range"] = byte_range.content_range
    return _file_headers(response, artifact, etag, length, door)


def _record_stream(visit: Visit, link: DownloadLink, artifact: Artifact, status: int, length: int):
    """The event of a stream that ended, with the refusal's outcome (revoked, license,
    budget) when the portal stopped it."""

    def record(sent: int, stopped: LinkRefused | None) -> None:
        if stopped is not None:
            outcome = Refusal.from_error(stopped).outcome
            logger.info("stopped a download on link %s after %d bytes: %s", link.pk, sent, outcome)
        else:
            outcome = Outcome.SERVED if sent == length else Outcome.PARTIAL
        visit.record(link=link, artifact=artifact, nbytes=sent, status=status, outcome=outcome)

    return record


def _monotonic() -> float:
    return time.monotonic()


class StreamStopped(Exception):
    """Raised into the WSGI server to make it drop the connection of a stream cut short."""


class MeteredStream:
    """Yields the bytes of `flow`'s range in chunks, charging them a step ahead
    (FlowingCharge), and settles exactly once, on close(), even when iteration never began:
    a client that goes away is charged only for what was written to it.

    Every RECHECK_SECONDS or RECHECK_BYTES, `recheck` says whether the transfer may go on;
    a refusal ends the stream there (the client sees a short body and can tell). So does a
    budget that a parallel request spent meanwhile."""

    def __init__(
        self,
        handle: BinaryIO,
        flow: FlowingCharge,
        *,
        on_close: Callable[[int, LinkRefused | None], None],
        recheck: Callable[[], LinkRefused | None] | None = None,
    ) -> None:
        self.handle, self.flow = handle, flow
        self.start, self.length = flow.start, flow.end - flow.start
        self.sent = 0
        self.stopped: LinkRefused | None = None
        self._on_close = on_close
        self._recheck = recheck
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        self.handle.seek(self.start)
        remaining = self.length
        checked_at, checked_bytes = _monotonic(), 0
        while remaining > 0 and not self._closed:
            if self._recheck is not None and (
                self.sent - checked_bytes >= RECHECK_BYTES
                or _monotonic() - checked_at >= RECHECK_SECONDS
            ):
                self.stopped = self._recheck()
                if self.stopped is not None:
                    break
                checked_at, checked_bytes = _monotonic(), self.sent
            position = self.start + self.sent
            if position >= self.flow.charged_to and not self.flow.extend(position):
                self.stopped = budget_spent_error(self.flow.link, self.flow.artifact)
                break
            chunk = self.handle.read(min(CHUNK_SIZE, remaining, self.flow.charged_to - position))
            if not chunk:
                break  # the file is shorter than recorded: settling gives back the rest
            yield chunk
            self.sent += len(chunk)
            remaining -= len(chunk)
        if remaining > 0 and not self._closed:
            # Content-Length promised more: only a closed connection tells the client that
            # the body is short (it then resumes, or reads the refusal on its next request),
            # where a kept-alive one would leave it waiting for bytes that never come.
            raise StreamStopped(f"stopped after {self.sent} of {self.length} bytes")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.handle.close()
        try:
            self.flow.settle(self.start + self.sent)
            self._on_close(self.sent, self.stopped)
        except Exception:
            # Django swallows errors raised by closers; make sure this one is seen.
            logger.exception("could not settle a download stream")
            raise


def _serve_accel(
    request: HttpRequest,
    visit: Visit,
    link: DownloadLink,
    artifact: Artifact,
    key: str,
    byte_range: ByteRange | None,
    etag: str,
    door: Door,
) -> HttpResponse:
    """nginx sends the bytes under `key` (and applies the Range itself); we charge the
    authorised range."""
    if request.headers.get("If-Range") is not None:
        # nginx checks If-Range against its own ETag, never ours, and sends the whole file.
        byte_range = None
    span = (byte_range.start, byte_range.end + 1) if byte_range else (0, artifact.size)
    if not authorise(link=link, artifact=artifact, address=visit.ip_address, span=span):
        return _refuse_budget(request, visit, link, artifact, door)
    status = 206 if byte_range else 200
    nbytes = span[1] - span[0]
    visit.record(link=link, artifact=artifact, nbytes=nbytes, status=status, outcome=Outcome.SERVED)
    response = _file_headers(HttpResponse(b""), artifact, etag, None, door)
    response["X-Accel-Redirect"] = settings.WEIGHTS_X_ACCEL_PREFIX + quote(key)
    return response


REACHABLE_CACHE_SECONDS = 10


def _object_reachable(storage, artifact: Artifact, key: str) -> bool:
    """HEAD the object at most every few seconds per key; False when storage is down."""
    cache_key = f"weights:reachable:{key}"
    if cache.get(cache_key):
        return True
    try:
        present = storage.size_of(key) is not None
    except StorageError:
        logger.warning("weight storage unreachable for artifact %s", artifact.pk, exc_info=True)
        return False
    if present:
        cache.set(cache_key, True, REACHABLE_CACHE_SECONDS)
    return present


def _serve_redirect(
    request: HttpRequest,
    visit: Visit,
    storage,
    link: DownloadLink,
    artifact: Artifact,
    key: str,
    byte_range: ByteRange | None,
    door: Door,
) -> HttpResponse:
    """S3: a presigned GET of `key` minted now, valid for minutes; we charge the authorised
    range."""
    span = (byte_range.start, byte_range.end + 1) if byte_range else (0, artifact.size)
    nbytes = span[1] - span[0]
    if not _object_reachable(storage, artifact, key):
        # Presigning is local: without this a bucket outage would charge for bytes that
        # can never arrive.
        return _refuse_file(request, visit, unavailable(), link=link, artifact=artifact, door=door)
    # Presigning cannot fail once the object answered, so the charge comes first and a
    # refusal never leaves a usable URL behind.
    if not authorise(link=link, artifact=artifact, address=visit.ip_address, span=span):
        return _refuse_budget(request, visit, link, artifact, door)
    try:
        url = storage.presigned_get(
            key,
            expires_in=settings.WEIGHTS_PRESIGN_SECONDS,
            filename=posixpath.basename(artifact.path),
            # Signed in exactly as the client sent it: the client repeats it to S3.
            byte_range=visit.range_header if byte_range else None,
        )
    except StorageError:
        refund(link=link, artifact=artifact, paid=nbytes)
        logger.exception("could not presign artifact %s", artifact.pk)
        return _refuse_file(request, visit, unavailable(), link=link, artifact=artifact, door=door)
    visit.record(
        link=link, artifact=artifact, nbytes=nbytes, status=302, outcome=Outcome.REDIRECTED
    )
    response = HttpResponseRedirect(url)
    for name, value in door.headers.items():
        response[name] = value
    return protect(response)
