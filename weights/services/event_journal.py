"""Download events in batches, through a per-process journal that outlives the process.

One INSERT (and a flag check) per file request costs too much at launch-day load, and
events held in memory die with a killed worker. So each process appends one JSON line per
event to its own file under `WEIGHTS_EVENT_JOURNAL_DIR`, with a single `os.write` on an
O_APPEND descriptor: once that returns, the line is in the kernel's page cache and survives
`kill -9` of the process. Only a machine crash or power cut can lose lines the kernel has
not yet written back (no fsync: that would cost a disk flush per request).

`<pid>-<hex>.active` is the file a live process appends to, `.sealed` one rotated out for
ingest. The owner holds `flock(LOCK_EX)` on it while it has it open, and the kernel drops
the lock when the process dies, even on SIGKILL: a file whose lock can be taken without
waiting belongs to no live process, and whoever takes it ingests it. Ingest inserts every
line in one transaction, then deletes the file; each line's `journal_id` is unique in
DownloadEvent, so a file ingested twice inserts nothing twice. A malformed line, or one
the database refuses, is logged and skipped, never holding back the rest of its file.

A daemon thread started on the first append ingests every `WEIGHTS_EVENT_FLUSH_SECONDS`,
and at once when `WEIGHTS_EVENT_BATCH` lines are pending; so do exit (atexit, gunicorn's
`worker_exit`) and the `flush_download_events` sweep. With `WEIGHTS_EVENT_BATCH = 1` there
is no file and no thread: the same parse-and-insert code runs in the calling thread, so
the row exists when `download_event_record` returns.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import ipaddress
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import DataError, IntegrityError, close_old_connections, transaction
from django.db.models import Count
from django.utils import timezone
from django.utils.ipv6 import clean_ipv6_address

from access.services.webhooks import links_flagged_emit
from weights.models import Artifact, DownloadEvent, DownloadLink

logger = logging.getLogger(__name__)

ACTIVE, SEALED = ".active", ".sealed"
INSERT_BATCH = 500  # rows per INSERT statement; one transaction per file regardless
PAIRS_PER_QUERY = 200  # (link, address) pairs per look-up: well under SQLite's variable limit
MALFORMED = "download-event journal %s, line %d: skipped, malformed (%s)"
REFUSED = "download-event journal %s: the database refused event %s, skipped (%s)"


# --- writing ------------------------------------------------------------------------------


def journal_record(record: Mapping[str, object]) -> None:
    """Journal one event (a DownloadEvent's fields, ids for the foreign keys); no queries
    unless WEIGHTS_EVENT_BATCH is 1 or the journal cannot be written."""
    line = json.dumps(record, separators=(",", ":")) + "\n"
    if settings.WEIGHTS_EVENT_BATCH <= 1:
        ingest_lines([line], source="inline")
        return
    try:
        _JOURNAL.append(line.encode())
    except OSError:
        # A full or read-only disk must not lose the event: write it the slow way.
        logger.exception("download-event journal not writable; inserting the event directly")
        ingest_lines([line], source="inline")


class _Journal:
    """This process's active journal file, its lock and its flusher thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.directory: Path | None = None
        self.path: Path | None = None
        self.fd: int | None = None
        self.pending = 0
        self.flusher: threading.Thread | None = None

    def forget(self) -> None:
        """After a fork: the parent's file, lock and thread are the parent's, not ours."""
        if self.fd is not None:
            os.close(self.fd)  # our copy only: the parent's descriptor keeps its lock
        self.__init__()

    def append(self, line: bytes) -> None:
        if self.pid != os.getpid():  # forked without os.fork's hooks
            self.forget()
        with self.lock:
            directory = Path(settings.WEIGHTS_EVENT_JOURNAL_DIR)
            if self.fd is None or directory != self.directory:
                self._open(directory)
            view = memoryview(line)
            try:
                while view:  # one write in practice; a short write only on a full disk
                    view = view[os.write(self.fd, view) :]
            except OSError:
                # A torn line would swallow the next one: the file goes to a sweep as it is.
                os.close(self.fd)
                self.fd = self.path = None
                raise
            self.pending += 1
            due = self.pending >= settings.WEIGHTS_EVENT_BATCH
            if self.flusher is None:
                self.flusher = threading.Thread(
                    target=_flush_forever, args=(self,), name="download-events", daemon=True
                )
                self.flusher.start()
        if due:
            self.wake.set()

    def _open(self, directory: Path) -> None:
        if self.fd is not None:  # the directory setting changed: leave the old file to a sweep
            os.close(self.fd)
        self.fd = None
        directory.mkdir(parents=True, exist_ok=True)
        self.path, self.fd = _create_locked(directory)
        self.directory, self.pending = directory, 0

    def seal(self) -> tuple[Path, int] | None:
        """Rotate out the active file if it has lines: (sealed path, descriptor holding its lock)."""
        with self.lock:
            if self.pid != os.getpid() or self.fd is None or self.pending == 0:
                return None
            path, fd = self.path, self.fd
            self.path, self.fd, self.pending = None, None, 0  # the next append opens a new one
            sealed = path.with_suffix(SEALED)
            try:
                os.rename(path, sealed)
            except OSError:
                os.close(fd)
                logger.exception("download-event journal %s could not be sealed", path)
                return None
            return sealed, fd


def _create_locked(directory: Path) -> tuple[Path, int]:
    """A new active file, locked. A sweep may grab and delete a brand-new empty file between
    our open and our lock; then we start again with another name."""
    while True:
        path = directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}{ACTIVE}"
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _still_named(path, fd):
                return path, fd
        except BlockingIOError:
            pass
        os.close(fd)


def _still_named(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open on `fd` (not deleted, not renamed)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


_JOURNAL = _Journal()
os.register_at_fork(after_in_child=_JOURNAL.forget)


def _flush_forever(journal: _Journal) -> None:
    while True:
        journal.wake.wait(timeout=settings.WEIGHTS_EVENT_FLUSH_SECONDS)
        journal.wake.clear()
        try:
            journal_flush()
        except Exception:
            logger.exception("download events not inserted yet; they stay in the journal")
        finally:
            close_old_connections()  # this thread has no request cycle to do it


# --- ingesting ----------------------------------------------------------------------------


def journal_flush(*, orphans: bool = True) -> int:
    """Insert this process's pending events and, with `orphans`, every journal file no live
    process holds; returns how many rows were inserted. Rerun-safe."""
    inserted = 0
    sealed = _JOURNAL.seal()
    if sealed is not None:
        path, fd = sealed
        try:
            inserted += _ingest_file(path, fd)
        finally:
            os.close(fd)  # on failure the file stays, unlocked, for the next sweep
    if orphans:
        inserted += _ingest_orphans(Path(settings.WEIGHTS_EVENT_JOURNAL_DIR))
    return inserted


def journal_close() -> None:
    """At exit: insert this process's pending events; what fails stays for the sweep."""
    try:
        journal_flush(orphans=False)
    except Exception:
        logger.exception("download events left in the journal at exit, for the next sweep")


atexit.register(journal_close)  # a no-op for a process that journalled nothing


def _ingest_orphans(directory: Path) -> int:
    inserted = 0
    paths = sorted(directory.glob(f"*{SEALED}")) + sorted(directory.glob(f"*{ACTIVE}"))
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # ingested by someone else meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _still_named(path, fd):
                inserted += _ingest_file(path, fd)
        except BlockingIOError:
            pass  # a live process holds it (ours included: one lock per open)
        finally:
            os.close(fd)
    return inserted


def _ingest_file(path: Path, fd: int) -> int:
    """Insert the lines of the file whose lock `fd` holds, then delete it."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b"".join(iter(functools.partial(os.read, fd, 1 << 20), b""))
    inserted = ingest_lines(data.split(b"\n"), source=path.name)
    path.unlink()
    return inserted


def ingest_lines(lines: Iterable[bytes | str], *, source: str) -> int:
    """Parse journal lines and insert the events not yet inserted; returns how many."""
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(_event_from_line(line))
        except (ValueError, TypeError, KeyError, ValidationError) as error:
            logger.error(MALFORMED, source, number, error)
    return _insert(events, source=source) if events else 0


def _event_from_line(line: bytes | str) -> DownloadEvent:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    created_at = datetime.fromisoformat(_text(record["created_at"]))
    if timezone.is_naive(created_at):
        raise ValueError("created_at has no time zone")
    outcome = _text(record["outcome"])
    if outcome not in DownloadEvent.Outcome.values:
        raise ValueError(f"unknown outcome {outcome!r}")
    return DownloadEvent(
        journal_id=uuid.UUID(_text(record["journal_id"])),
        created_at=created_at,
        link_id=_id(record["link_id"]),
        user_id=_id(record["user_id"]),
        artifact_id=_id(record["artifact_id"]),
        ip_address=_address(record["ip_address"]),
        user_agent=_text(record["user_agent"])[:300],
        range_header=_text(record["range_header"])[:200],
        bytes=_number(record["bytes"], below=2**63),
        status_code=_number(record["status_code"], below=2**15),
        outcome=outcome,
    )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value.replace("\x00", "")  # PostgreSQL refuses NUL in text


def _number(value: object, *, below: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < below:
        raise ValueError(f"not a count: {value!r}")
    return value


def _id(value: object) -> int | None:
    return None if value is None else _number(value, below=2**63)


def _address(value: object) -> str | None:
    """The address as the database stores it, so that look-ups by address match."""
    if value is None:
        return None
    text = _text(value)
    if "%" in text:
        raise ValueError(f"an address with a scope: {text!r}")
    return clean_ipv6_address(text) if ":" in text else str(ipaddress.IPv4Address(text))


def _insert(events: list[DownloadEvent], *, source: str) -> int:
    events = _new_events(_with_live_references(events))
    if not events:
        return 0
    with contextlib.suppress(DataError, IntegrityError), transaction.atomic():
        return _insert_and_flag(events)
    # One bad row must not hold back its file: insert one by one, skip what is refused.
    inserted = 0
    for event in events:
        try:
            with transaction.atomic():
                _insert_and_flag([event])
        except (DataError, IntegrityError) as error:  # at the statement or at the commit
            logger.error(REFUSED, source, event.journal_id, error)
        else:
            inserted += 1
    return inserted


def _with_live_references(events: list[DownloadEvent]) -> list[DownloadEvent]:
    """What the database would have done had the rows existed when their link, user or
    artifact was deleted: events of a deleted link or user go (CASCADE), a deleted artifact
    becomes empty (SET_NULL). A dangling id would fail the whole insert."""
    links = _existing(DownloadLink, {e.link_id for e in events}) | {None}
    users = _existing(get_user_model(), {e.user_id for e in events}) | {None}
    artifacts = _existing(Artifact, {e.artifact_id for e in events})
    for event in events:
        if event.artifact_id not in artifacts:
            event.artifact_id = None
    return [e for e in events if e.link_id in links and e.user_id in users]


def _existing(model, ids: set[int | None]) -> set[int]:
    ids.discard(None)
    return set(model.objects.filter(pk__in=ids).values_list("pk", flat=True)) if ids else set()


def _new_events(events: list[DownloadEvent]) -> list[DownloadEvent]:
    """Leave out lines already inserted (a file ingested again), and repeats within the batch."""
    unique = {event.journal_id: event for event in events}
    ids = list(unique)
    for start in range(0, len(ids), INSERT_BATCH):
        seen = DownloadEvent.objects.filter(journal_id__in=ids[start : start + INSERT_BATCH])
        for journal_id in seen.values_list("journal_id", flat=True):
            unique.pop(journal_id, None)
    return list(unique.values())


def _insert_and_flag(events: list[DownloadEvent]) -> int:
    """Insert the batch; flag links it took past WEIGHTS_LINK_MAX_IPS addresses. Only a
    first request from an address can do that, so only links with one are counted."""
    pairs = {(e.link_id, e.ip_address) for e in events if e.link_id and e.ip_address}
    fresh = pairs - _known_pairs(pairs)
    DownloadEvent.objects.bulk_create(events, batch_size=INSERT_BATCH, ignore_conflicts=True)
    if fresh:
        _flag_crowded_links({link_id for link_id, _ in fresh})
    return len(events)


def _known_pairs(pairs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    known: set[tuple[int, str]] = set()
    ordered = sorted(pairs)
    for start in range(0, len(ordered), PAIRS_PER_QUERY):
        chunk = ordered[start : start + PAIRS_PER_QUERY]
        rows = DownloadEvent.objects.filter(
            link_id__in={link_id for link_id, _ in chunk},
            ip_address__in={address for _, address in chunk},
        ).values_list("link_id", "ip_address")
        known.update(rows.distinct())
    return known & pairs


def _flag_crowded_links(link_ids: set[int]) -> None:
    limit = settings.WEIGHTS_LINK_MAX_IPS
    crowded = (
        DownloadEvent.objects.filter(
            link_id__in=link_ids, link__flagged_at__isnull=True, ip_address__isnull=False
        )
        .values("link_id")
        .annotate(addresses=Count("ip_address", distinct=True))
        .filter(addresses__gt=limit)
        .values("link_id")
    )
    flagged_at = timezone.now()
    flagged = DownloadLink.objects.filter(pk__in=crowded, flagged_at__isnull=True).update(
        flagged_at=flagged_at
    )
    if flagged:
        links_flagged_emit(link_ids=link_ids, flagged_at=flagged_at)
        logger.warning("flagged %d download links used from more than %d addresses", flagged, limit)
