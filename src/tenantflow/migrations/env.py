"""Alembic environment, from Alembic's async template.

Three ways in:

* `tenantflow migrate` (the `migrate` flow) connects through the session pooler,
  takes the migration advisory lock and hands its connection over in
  `config.attributes["connection"]`; this file then only runs the migrations on it.
* Offline mode (`dry_run`, `alembic ... --sql`) renders SQL for PostgreSQL without
  any connection or credentials.
* Alembic's own CLI online (e.g. `revision --autogenerate`) connects the same way
  `tenantflow migrate` does: MIGRATION_DATABASE_URL from `Settings`, checked to be
  the session pooler, `NullPool`, under the same advisory lock.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from tenantflow.schema import include_object, metadata

config = context.config


def _configure_options() -> dict[str, Any]:
    return {
        "target_metadata": metadata,
        "include_object": include_object,
        "compare_type": True,
        # NOTE: one transaction for the whole run: PostgreSQL has transactional DDL, so
        # a failed upgrade leaves the database at the revision it started from.
        "transaction_per_migration": False,
    }


def run_migrations_offline() -> None:
    """Render SQL for PostgreSQL; no URL and no connection are needed."""
    context.configure(
        dialect_name="postgresql",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_configure_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, **_configure_options())
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    """Alembic's CLI: connect like `tenantflow migrate` does, lock included."""
    from tenantflow.migrate import locked_migration_connection
    from tenantflow.settings import get_settings

    async with locked_migration_connection(get_settings()) as connection:
        await connection.run_sync(do_run_migrations)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
