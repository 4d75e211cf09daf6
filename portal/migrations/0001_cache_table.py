"""The database cache's table, so that `migrate` alone prepares an embedded install.

Embedded mode keeps rate-limit counters in the database (settings.CACHES), and a portal
without the table would fail every login. `createcachetable` creates only the tables of
the DatabaseCache backends configured, and none that exists: in services mode (Redis) and
under the test settings this does nothing. A database first migrated in services mode
and then used embedded needs `manage.py createcachetable` once.
"""

from __future__ import annotations

from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor) -> None:
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies: list[tuple[str, str]] = []

    operations = [migrations.RunPython(create_cache_table, migrations.RunPython.noop)]
