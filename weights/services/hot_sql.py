"""The statements every file request runs, prepared once per connection on PostgreSQL.

Django turns psycopg's prepared statements off (they break transaction-mode connection
poolers such as pgbouncer < 1.21). The hot path's two statements are the exception: they
run through Django's own connection and cursor wrapper (logged and counted like any
query), on a server-binding cursor with `prepare=True`, so PostgreSQL parses and plans
each once per connection instead of once per request. WEIGHTS_PREPARED_STATEMENTS=0
turns this off (behind such a pooler). SQLite has nothing to prepare.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

from django.conf import settings
from django.db import connection


class _Preparing:
    """A psycopg cursor whose every statement is prepared."""

    def __init__(self, cursor) -> None:
        self._cursor = cursor
        self._sql = ""

    def execute(self, sql: str, params: Sequence[object] | None = None):
        self._sql = sql
        return self._cursor.execute(sql, params, prepare=True)

    @property
    def _query(self) -> SimpleNamespace:
        # What Django's query log reads (a prepared statement keeps no query text of its
        # own): the statement with its placeholders, never the values.
        return SimpleNamespace(query=self._sql.encode())

    def __getattr__(self, name: str):
        return getattr(self._cursor, name)


def hot_cursor():
    """A cursor (context manager) for the hot path's statements."""
    if connection.vendor != "postgresql" or not settings.WEIGHTS_PREPARED_STATEMENTS:
        return connection.cursor()
    import psycopg

    connection.ensure_connection()
    raw = connection.connection
    if raw.prepare_threshold is None:  # Django's "off"; only server-binding cursors prepare
        raw.prepare_threshold = 5
    return connection._prepare_cursor(_Preparing(psycopg.Cursor(raw)))
