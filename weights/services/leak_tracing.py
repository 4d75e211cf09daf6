"""Whose copy leaked: trace suspect weight files to the grants of a fingerprinted release.

``weights.fingerprint.trace`` scores the suspect against candidate codes; this module
supplies what only the portal knows: which releases are fingerprinted, their originals on
disk, every grant ever made of them (revoked ones too: a copy downloaded before the
revocation still names its recipient), who holds each grant, and a signature over the
evidence so that a report kept by an operator can later be shown to be unaltered.

The signature is django.core.signing's HMAC-SHA256 under the portal's SECRET_KEY (with
SECRET_KEY_FALLBACKS honoured on verification), salted for this use alone. It proves
the report came from this portal unchanged; it does not make the portal's word
independent: the method and every number needed to recompute the scores are in it.
"""

from __future__ import annotations

import contextlib
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.core import signing

from access.models import Grant
from weights.models import Artifact, Release
from weights.services.fingerprinting import SHARD, original_path

if TYPE_CHECKING:  # torch: the tracer runs in management commands, never in the web process
    from weights.fingerprint.trace import CandidateScore, ReleaseMarks, TraceResult

SALT = "weights.leak_tracing.evidence"
SIGNATURE_SCHEME = "django.core.signing.Signer, HMAC-SHA256, SECRET_KEY"
EVIDENCE_VERSION = 1
PARAMS = "params.json"

ERR_NO_RELEASE = "no release {slug!r}"
ERR_NOT_FINGERPRINTED = "{release} is not fingerprinted: its copies carry no recipient's mark"
ERR_NONE_FINGERPRINTED = "no release is fingerprinted: there is nothing to trace against"
ERR_NO_GRANTS = "{release} has no grants: no copy of it has left the portal"
ERR_NO_ORIGINAL = "{release}: its published Meta-layout files ({names}) are not all stored"
ERR_BAD_EVIDENCE = "not an evidence report of this portal ({reason})"


class LeakTraceError(Exception):
    """Bad input to a trace (no such release, nothing to trace against); the message says which."""


@dataclass(frozen=True)
class GrantMatch:
    grant: Grant
    score: CandidateScore
    named: bool

    def as_dict(self) -> dict[str, Any]:
        return {"named": self.named, "recipient": recipient(self.grant), **self.score.as_dict()}


@dataclass(frozen=True)
class ReleaseTrace:
    release: Release
    result: TraceResult
    matches: list[GrantMatch]  # best first

    @property
    def named(self) -> list[GrantMatch]:
        return [m for m in self.matches if m.named]


def label(grant_id: int) -> str:
    return f"grant {grant_id}"


def recipient(grant: Grant) -> dict[str, Any]:
    """Who holds the grant, for the operator: account, grant, and how it came about."""
    user = grant.user
    return {
        "grant_id": grant.pk,
        "account": {
            "id": user.pk,
            "username": user.get_username(),
            "email": user.email,
            "name": user.get_full_name(),
        },
        "application_id": grant.application_id,
        "granted_at": _iso(grant.created_at),
        "granted_by": grant.granted_by.get_username(),
        "revoked_at": _iso(grant.revoked_at),
        "license_version": grant.license_version.version,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def fingerprinted_releases(slug: str | None = None) -> list[Release]:
    if slug is not None:
        release = Release.objects.filter(slug=slug).first()
        if release is None:
            raise LeakTraceError(ERR_NO_RELEASE.format(slug=slug))
        if not release.fingerprinted:
            raise LeakTraceError(ERR_NOT_FINGERPRINTED.format(release=release))
        return [release]
    releases = list(Release.objects.filter(fingerprinted=True).order_by("slug"))
    if not releases:
        raise LeakTraceError(ERR_NONE_FINGERPRINTED)
    return releases


def candidate_grants(release: Release) -> dict[str, Grant]:
    """Every grant of the release, revoked ones included, by its label in the trace."""
    grants = Grant.objects.filter(release=release).select_related(
        "user", "granted_by", "license_version", "release"
    )
    return {label(g.pk): g for g in grants.order_by("pk")}


def _original_files(release: Release) -> list[Artifact]:
    """The published Meta layout the marks are defined on: its shards and params.json."""
    originals = release.artifacts.filter(variant=Artifact.Variant.ORIGINAL)
    shards = [a for a in originals if SHARD.match(posixpath.basename(a.path))]
    folders = {posixpath.dirname(a.path) for a in shards}
    params = [a for a in originals if a.path == posixpath.join(*folders, PARAMS)]
    if not shards or len(folders) != 1 or len(params) != 1:
        names = f"consolidated.NN.pth and {PARAMS} in one folder"
        raise LeakTraceError(ERR_NO_ORIGINAL.format(release=release, names=names))
    return [*sorted(shards, key=lambda a: a.path), *params]


@contextlib.contextmanager
def original_directory(release: Release) -> Iterator[Path]:
    """A directory laid out as the release was published (links to the stored files)."""
    with tempfile.TemporaryDirectory(prefix="trace-original-") as tmp:
        directory = Path(tmp)
        for artifact in _original_files(release):
            (directory / posixpath.basename(artifact.path)).symlink_to(original_path(artifact))
        yield directory


def release_marks_for(release: Release) -> ReleaseMarks:
    from weights.fingerprint.trace import release_marks

    with original_directory(release) as directory:
        return release_marks(directory, bytes(release.fingerprint_key))


def trace_release(
    release: Release,
    paths: Iterable[str | Path],
    *,
    marks: ReleaseMarks | None = None,
    **options: Any,
) -> ReleaseTrace:
    """Score the suspect files against every grant of ``release``. Options go to
    ``weights.fingerprint.trace.trace_suspect`` (threshold, screen/confirm sizes)."""
    from weights.fingerprint.keys import recipient_code
    from weights.fingerprint.trace import open_suspect, trace_suspect

    grants = candidate_grants(release)
    if not grants:
        raise LeakTraceError(ERR_NO_GRANTS.format(release=release))
    key = bytes(release.fingerprint_key)
    if marks is None:
        marks = release_marks_for(release)
    codes = {name: recipient_code(key, grant.pk) for name, grant in grants.items()}
    result = trace_suspect(open_suspect(paths, marks), marks, codes, **options)
    named = set(result.named)
    matches = [GrantMatch(grants[c.label], c, c.label in named) for c in result.candidates]
    return ReleaseTrace(release, result, matches)


def trace_leak(
    paths: Iterable[str | Path], *, slug: str | None = None, **options: Any
) -> list[ReleaseTrace]:
    """Trace against one release, or every fingerprinted release with grants; the traces
    that name someone come first, then those closest to being derived from the release."""
    paths = list(paths)
    traces = []
    for release in fingerprinted_releases(slug):
        if slug is None and not Grant.objects.filter(release=release).exists():
            continue
        traces.append(trace_release(release, paths, **options))
    if not traces:
        raise LeakTraceError(ERR_NO_GRANTS.format(release="no fingerprinted release"))
    return sorted(traces, key=_trace_order)


def _trace_order(trace: ReleaseTrace) -> tuple[int, int, float]:
    rel = trace.result.closeness.get("relative_rms_difference")
    return (not trace.named, not trace.result.derived, rel if rel is not None else float("inf"))


def evidence(trace: ReleaseTrace, top: int = 10) -> dict[str, Any]:
    """The report an operator keeps: the tracer's evidence, plus the release and the
    recipients behind the best-scoring grants. No secret is in it."""
    from weights.fingerprint.trace import evidence_json

    body = evidence_json(trace.result)
    body["portal_release"] = {
        "id": trace.release.pk,
        "slug": trace.release.slug,
        "name": trace.release.name,
        "grants_scored": len(trace.matches),
    }
    body["named_recipients"] = [recipient(m.grant) for m in trace.named]
    body["top"] = [m.as_dict() for m in trace.matches[:top]]
    return {"evidence_version": EVIDENCE_VERSION, **body}


def _canonical(body: dict[str, Any]) -> str:
    from weights.fingerprint.trace import dumps

    return dumps(body)


def sign(body: dict[str, Any]) -> dict[str, Any]:
    """The report with an HMAC over its canonical JSON (sorted keys, no spaces)."""
    signed = signing.Signer(salt=SALT, algorithm="sha256").sign(_canonical(body))
    return {
        "evidence": body,
        "signature": {
            "scheme": SIGNATURE_SCHEME,
            "salt": SALT,
            "covers": "the canonical JSON of 'evidence' (sorted keys, separators ',' ':')",
            "value": signed.rsplit(":", 1)[1],
        },
    }


def verify(document: dict[str, Any]) -> dict[str, Any]:
    """The evidence of a signed report, if its signature holds; LeakTraceError if not."""
    try:
        body, value = document["evidence"], document["signature"]["value"]
        canonical = _canonical(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise LeakTraceError(ERR_BAD_EVIDENCE.format(reason=f"missing {exc}")) from None
    try:
        signing.Signer(salt=SALT, algorithm="sha256").unsign(f"{canonical}:{value}")
    except signing.BadSignature:
        raise LeakTraceError(
            ERR_BAD_EVIDENCE.format(reason="the signature does not match its contents")
        ) from None
    return body
