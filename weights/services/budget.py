"""What a file request costs: byte budgets, charged as bytes flow or as ranges are authorised.

The rule (docs/downloads.md, "What a download costs"): a link allows `budget_copies` full
copies of each file, in bytes. Bytes already charged to a client address on the link are
free to that address again for WEIGHTS_RESUME_WINDOW_SECONDS: a resume after a cut, a
retry, a parallel client asking for a piece another connection already fetched. Those
free bytes are capped at WEIGHTS_RESUME_FREE_COPIES copies' worth per file, and each file
has a small slack over N copies (WEIGHTS_BUDGET_SLACK_BYTES, at most the file's size) for
the bytes a cut leaves in network buffers when the resume comes from another address.
Another address never gets bytes for free, so a link shared between machines stops at N
copies plus the slack. A request is admitted only if its whole range fits in what is
left, so a stream is cut short only when two start together on the last copy.

Every charge is one conditional UPDATE (`bytes_charged <= ceiling - n`), so parallel
requests race safely. What an address already has lives in the cache as "leases": one
entry per request, written only by that request, so parallel requests never overwrite
each other's record. A lost cache costs only the free re-request (the bytes are charged
again); it can never let more bytes through.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import F
from django.urls import reverse

from weights.models import Artifact, DownloadLink, LinkUsage
from weights.services.hot_sql import hot_cursor

BUDGET = "This link has used its download budget for {path} (full copies allowed: {copies}). Request a fresh link on My downloads."
LEASE_SPANS = 64  # separate spans remembered per cache entry; the latest win
SLOTS = 32  # cache entries per (link, file, address), written by requests picked at random

Span = tuple[int, int]  # [start, end) in bytes


def budget_limit(link: DownloadLink, artifact: Artifact) -> int:
    """N full copies: what pages and the manifest call the budget."""
    return link.budget_copies * artifact.size


def budget_slack(artifact: Artifact) -> int:
    return min(settings.WEIGHTS_BUDGET_SLACK_BYTES, artifact.size)


def budget_ceiling(link: DownloadLink, artifact: Artifact) -> int:
    """The most a link may ever be charged for a file: N copies plus the slack."""
    return budget_limit(link, artifact) + budget_slack(artifact)


def free_ceiling(artifact: Artifact) -> int:
    return settings.WEIGHTS_RESUME_FREE_COPIES * artifact.size


def budget_spent_error(link: DownloadLink, artifact: Artifact):
    from weights.services.links import BudgetSpent

    return BudgetSpent(
        BUDGET.format(path=artifact.path, copies=link.budget_copies),
        link=link,
        action_url=reverse("weights:my_downloads"),
    )


def usages_create(*, link: DownloadLink, artifacts: Iterable[Artifact]) -> None:
    """The counter rows of a new link, so that a file request needs only its UPDATE."""
    LinkUsage.objects.bulk_create(
        [LinkUsage(link=link, artifact=artifact) for artifact in artifacts],
        ignore_conflicts=True,
    )


_UPDATE = (
    "UPDATE {table} SET bytes_charged = bytes_charged + %s, bytes_forgiven = bytes_forgiven + %s "
    "WHERE link_id = %s AND artifact_id = %s AND bytes_charged <= %s AND bytes_forgiven <= %s"
)


def _update(link: DownloadLink, artifact: Artifact, paid: int, free: int, need: int) -> bool:
    """The conditional UPDATE, written out: it runs on every step of every download, and
    the ORM takes ten times longer to compose it than the database takes to run it."""
    ceiling = budget_ceiling(link, artifact) - max(paid, need)
    free_cap = free_ceiling(artifact) - free
    with hot_cursor() as cursor:
        cursor.execute(
            _UPDATE.format(table=LinkUsage._meta.db_table),
            [paid, free, link.pk, artifact.pk, ceiling, free_cap],
        )
        return cursor.rowcount == 1


def _ensure_usage(link: DownloadLink, artifact: Artifact) -> bool:
    """Create the counter row if it is missing (a link issued before a file was
    published); True when it was missing."""
    try:
        with transaction.atomic():
            _, created = LinkUsage.objects.get_or_create(link=link, artifact=artifact)
    except IntegrityError:
        return True  # created concurrently
    return created


def charge(
    *, link: DownloadLink, artifact: Artifact, paid: int, free: int = 0, need: int = 0
) -> bool:
    """Charge `paid` bytes and count `free` ones, atomically, if the budget has room for
    `need` bytes (what the whole request will cost: a stream that cannot finish is refused
    before it starts); False when it has not (or the cap on free bytes is reached, and the
    budget cannot take them as paid bytes either)."""
    if paid <= 0 and free <= 0 and need <= 0:
        return True
    if _update(link, artifact, paid, free, need):
        return True
    if free > 0 and _update(link, artifact, paid + free, 0, need + free):
        return True
    return _ensure_usage(link, artifact) and charge(
        link=link, artifact=artifact, paid=paid, free=free, need=need
    )


def refund(*, link: DownloadLink, artifact: Artifact, paid: int, free: int = 0) -> None:
    """Give back bytes charged but never sent (the stream ended before them)."""
    if paid > 0 or free > 0:
        LinkUsage.objects.filter(link=link, artifact=artifact).update(
            bytes_charged=F("bytes_charged") - max(paid, 0),
            bytes_forgiven=F("bytes_forgiven") - max(free, 0),
        )


# --- what an address already has ------------------------------------------------------


def _lease_key(link: DownloadLink, artifact: Artifact, address: str) -> str:
    return f"weights:lease:{link.pk}:{artifact.pk}:{address}"


@dataclass
class Leases:
    """The spans already charged to one address for one file on one link, kept in SLOTS
    cache entries: a request reads them all when it starts (and at each further step of
    a stream), and rewrites one, picked at random, with its span merged in: two cache
    round trips. Only two requests running at the same moment from one address that
    picked the same slot can lose one's span; that address then pays again for those
    bytes (the fail-safe side)."""

    link: DownloadLink
    artifact: Artifact
    base: str | None
    slot: int = 0
    slots: dict[int, list[Span]] = field(default_factory=dict)

    @classmethod
    def open(cls, *, link: DownloadLink, artifact: Artifact, address: str | None) -> Leases:
        if not address or settings.WEIGHTS_RESUME_WINDOW_SECONDS <= 0:
            return cls(link=link, artifact=artifact, base=None)
        leases = cls(link=link, artifact=artifact, base=_lease_key(link, artifact, address))
        leases.slot = random.randrange(SLOTS)  # noqa: S311 (spreading writes, not a secret)
        leases._read()
        return leases

    def _read(self) -> None:
        values = cache.get_many([f"{self.base}:{i}" for i in range(SLOTS)])
        self.slots = {int(key.rsplit(":", 1)[1]): _spans(value) for key, value in values.items()}

    def others(self, *, refresh: bool = False) -> list[Span]:
        """Spans this address was charged for before (by this request too, so far)."""
        if refresh and self.base is not None:
            self._read()
        return [span for spans in self.slots.values() for span in spans]

    def remember(self, span: Span) -> None:
        """Add what this request has been charged for so far (start, end)."""
        if self.base is not None and span[1] > span[0]:
            mine = merged([*self.slots.get(self.slot, []), span])[-LEASE_SPANS:]
            self.slots[self.slot] = mine
            cache.set(f"{self.base}:{self.slot}", mine, settings.WEIGHTS_RESUME_WINDOW_SECONDS)


def _spans(value: object) -> list[Span]:
    return [(int(s), int(e)) for s, e in value] if isinstance(value, list) else []


def merged(spans: Iterable[Span]) -> list[Span]:
    """Sorted, with overlapping and touching spans joined."""
    out: list[Span] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def overlap(span: Span, spans: Iterable[Span]) -> int:
    """How many bytes of `span` some span in `spans` covers (each byte counted once)."""
    start, end = span
    covered = 0
    cursor = start
    for s, e in sorted((max(s, start), min(e, end)) for s, e in spans):
        s = max(s, cursor)
        if e > s:
            covered += e - s
            cursor = e
    return covered


def authorise(*, link: DownloadLink, artifact: Artifact, address: str | None, span: Span) -> bool:
    """Charge a range that nginx or S3 will send (we cannot see what arrives): the part
    this address was not already charged for is paid, the rest is free. False: refused."""
    leases = Leases.open(link=link, artifact=artifact, address=address)
    free = overlap(span, leases.others())
    if not charge(link=link, artifact=artifact, paid=span[1] - span[0] - free, free=free):
        return False
    leases.remember(span)
    return True


FIRST_STEP = 1024 * 1024
MAX_STEP = 64 * 1024 * 1024
# A stream that finds the budget short mid-file waits this long for a parallel request of
# the same client to give back what it will not send (aria2c closing a segment early).
CONTINUE_TRIES = 10
CONTINUE_WAIT_S = 0.2


@dataclass
class FlowingCharge:
    """The account of one stream the portal sends itself: bytes are charged a step ahead of
    the socket (1 MiB, doubling up to 64 MiB), and on close what was charged but not sent
    is given back. A chunk counts as sent once the server has written it."""

    link: DownloadLink
    artifact: Artifact
    leases: Leases
    start: int
    end: int
    charged_to: int = 0
    step: int = FIRST_STEP
    _last_span: Span = (0, 0)
    _last_paid: int = 0
    _last_others: tuple[Span, ...] = ()

    @classmethod
    def begin(
        cls, *, link: DownloadLink, artifact: Artifact, address: str | None, start: int, length: int
    ) -> FlowingCharge | None:
        """The account with its first step charged, or None when the budget refuses it."""
        flow = cls(
            link=link,
            artifact=artifact,
            leases=Leases.open(link=link, artifact=artifact, address=address),
            start=start,
            end=start + length,
            charged_to=start,
            step=FIRST_STEP,
        )
        return flow if flow._charge_step(first=True) else None

    def _charge_step(self, *, first: bool = False) -> bool:
        span = (self.charged_to, min(self.end, self.charged_to + self.step))
        # A further step looks again: a parallel connection may have fetched these bytes.
        others = tuple(self.leases.others(refresh=not first))
        free = overlap(span, others)
        paid = span[1] - span[0] - free
        # Admitted only if the whole range fits now; then charged step by step.
        need = self.end - self.start - overlap((self.start, self.end), others) if first else 0
        if not charge(link=self.link, artifact=self.artifact, paid=paid, free=free, need=need):
            return False
        self._last_span, self._last_paid, self._last_others = span, paid, others
        self.charged_to = span[1]
        self.step = min(self.step * 2, MAX_STEP)
        return True

    def extend(self, sent_to: int) -> bool:
        """Charge the next step once everything charged so far is sent; False when the
        budget stays short for CONTINUE_TRIES waits."""
        self.leases.remember((self.start, sent_to))
        for attempt in range(CONTINUE_TRIES):
            if self._charge_step():
                return True
            if attempt < CONTINUE_TRIES - 1:
                time.sleep(CONTINUE_WAIT_S)
        return False

    def settle(self, sent_to: int) -> None:
        """The stream ended at `sent_to`: remember what went out, give back the rest."""
        self.leases.remember((self.start, sent_to))
        if sent_to >= self.charged_to:
            return
        unsent = (max(sent_to, self._last_span[0]), self._last_span[1])
        # Count the unsent bytes as free where they could have been, so that a refund
        # never gives back more paid bytes than were paid.
        last_free = self._last_span[1] - self._last_span[0] - self._last_paid
        unsent_free = min(last_free, overlap(unsent, self._last_others))
        unsent_paid = unsent[1] - unsent[0] - unsent_free
        refund(link=self.link, artifact=self.artifact, paid=unsent_paid, free=unsent_free)
        self.charged_to = sent_to
