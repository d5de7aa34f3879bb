"""Fixtures of the migration tests.

Tests that migrate down and up, race or dry-run work on scratch databases of their own
(the stack's `postgres` database stays at head for everyone else); the row-level
security tests use the stack's database at head, inside transactions they roll back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from tenantflow.migrate import run_migration
from tenantflow.settings import get_settings
from tenantflow_dev import Stack
from tests.migrations.support import ScratchDatabase, create_database, drop_database

NewDatabase = Callable[..., Awaitable[ScratchDatabase]]


@pytest.fixture
async def new_database(stack: Stack) -> AsyncIterator[NewDatabase]:
    """Create scratch databases (Supabase's `auth` bootstrapped); all dropped afterwards."""
    created: list[ScratchDatabase] = []

    async def make(*, bootstrap: bool = True) -> ScratchDatabase:
        database = await create_database(stack.config, bootstrap=bootstrap)
        created.append(database)
        return database

    yield make
    for database in created:
        await drop_database(database)


@pytest.fixture
async def scratch(new_database: NewDatabase) -> ScratchDatabase:
    return await new_database()


@pytest.fixture
def scratch_env(
    scratch: ScratchDatabase, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ScratchDatabase]:
    """Point the process settings (what the flow reads) at the scratch database."""
    monkeypatch.setenv("MIGRATION_DATABASE_URL", scratch.migration_url)
    monkeypatch.setenv("DATABASE_URL", scratch.transaction_url)
    get_settings.cache_clear()
    yield scratch
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def scratch_schema_env(
    scratch: ScratchDatabase, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ScratchDatabase]:
    """Migrations go to the scratch database; the guard's audit stays in the stack's."""
    monkeypatch.setenv("MIGRATION_DATABASE_URL", scratch.migration_url)
    get_settings.cache_clear()
    yield scratch
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def main_database_at_head(stack: Stack) -> None:
    """The stack's own database at head (normally `make up` did it already)."""
    get_settings.cache_clear()
    asyncio.run(run_migration())
