"""Insert journalled download events that no live process will insert by itself.

A web process inserts its own journal (weights.services.event_journal) every
WEIGHTS_EVENT_FLUSH_SECONDS and at exit; a process killed with SIGKILL leaves its file
behind, unlocked. This sweep ingests every such file under WEIGHTS_EVENT_JOURNAL_DIR.
Rerun-safe: a line already inserted is not inserted again. Celery beat runs the same
sweep every minute (weights.tasks.flush_download_events).
"""

from __future__ import annotations

from django.core.management.base import BaseCommand

from weights.services.event_journal import journal_flush


class Command(BaseCommand):
    help = "Insert download events left in journals of processes that are gone."

    def handle(self, *args, **options) -> None:
        inserted = journal_flush()
        self.stdout.write(f"{inserted} download events inserted")
