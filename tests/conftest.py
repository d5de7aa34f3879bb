"""Shared fixtures: the real local stack (PostgreSQL 15, PgBouncer, Prefect server).

The suite starts the stack itself when it is not running, and takes it down
again at the end only if it was the one that started it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

from tenantflow_dev.config import StackConfig

CONFIG = StackConfig.from_env()
# NOTE: before anything imports Prefect, which reads its settings once, on import: every
# flow in the suite must talk to the stack's Prefect server (without PREFECT_API_URL it
# would quietly start a temporary one) and every `get_settings()` to the stack's poolers.
os.environ.update(CONFIG.environment())
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")

import asyncpg  # noqa: E402
import pytest  # noqa: E402

from tenantflow.settings import get_settings  # noqa: E402
from tenantflow_dev import Stack  # noqa: E402


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    stack = Stack(CONFIG)
    started = not all(part.healthy for part in stack.status())
    if started:
        stack.up(setup=True)  # services, migrations, demo data, deployments (no demo run)
    get_settings.cache_clear()
    yield stack
    if started and not os.environ.get("TENANTFLOW_KEEP_STACK"):
        stack.down()


@pytest.fixture
async def admin_conn(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """A direct superuser connection (Supabase's `supabase_admin`) for inspection."""
    conn = await asyncpg.connect(**stack.config.connect_parts(stack.config.pg_port, admin=True))
    try:
        yield conn
    finally:
        await conn.close()
