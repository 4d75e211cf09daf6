"""The embedded mode's cache table in every database, whatever the configured cache.

0001 created it only where settings.CACHES named a DatabaseCache, so a database first
migrated under Redis (services mode, the test settings) lacked it when a process used it
embedded. Downloads now keep per-address byte records in the cache, so every embedded
process needs the table; an unused table costs nothing in services mode.
"""

from __future__ import annotations

from django.core.management import call_command
from django.db import migrations

TABLE = "portal_cache"  # settings.CACHES LOCATION in embedded mode


def create_cache_table(apps, schema_editor) -> None:
    call_command("createcachetable", TABLE, database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [("portal", "0001_cache_table")]

    operations = [migrations.RunPython(create_cache_table, migrations.RunPython.noop)]
