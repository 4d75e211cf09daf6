"""Trigram indexes for the review queue's search, on PostgreSQL only.

The admin searches with `icontains`, which PostgreSQL runs as
`UPPER(col::text) LIKE UPPER('%term%')`: no B-tree helps, and at 100,000 applications a
search scanned the table twice (the page and its count), 300 ms. A GIN index over the same
expression with pg_trgm's operator class answers it from the index (~10 ms). SQLite has no
such index and does not need one at its sizes, so these are not model Meta indexes: a
migration runs `create_trigram_indexes` / `drop_trigram_indexes` (RunPython), and the bench,
which builds its schema from the models, calls it too. pg_trgm is a trusted extension
(PostgreSQL 13+): the database owner may create it.
"""

from __future__ import annotations

from typing import Any

# (index name, table, column): the expression is exactly what Django's icontains emits.
TRIGRAM_INDEXES = (
    ("application_name_trgm", "access_application", "full_name"),
    ("application_email_trgm", "access_application", "institutional_email"),
    ("application_affiliation_trgm", "access_application", "affiliation"),
    ("user_email_trgm", "auth_user", "email"),
)


def create_trigram_indexes(apps: Any, schema_editor: Any) -> None:
    """RunPython's signature: `migrations.RunPython(create_trigram_indexes, drop_trigram_indexes)`."""
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    quote = schema_editor.quote_name
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, table, column in TRIGRAM_INDEXES:
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {quote(name)} ON {quote(table)} "
            f"USING gin (UPPER({quote(column)}::text) gin_trgm_ops)"
        )


def drop_trigram_indexes(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    for name, _table, _column in TRIGRAM_INDEXES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")
