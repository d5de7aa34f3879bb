"""Shared fixtures: the real local stack (PostgreSQL 15, PgBouncer, Prefect server).

The suite starts the stack itself when it is not running, and takes it down
again at the end only if it was the one that started it. A run of `tests/unit` alone
(`make test-unit`) touches no stack: no stack files, no stack settings, no Prefect.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tenantflow_dev.config import StackConfig

if TYPE_CHECKING:
    import asyncpg

    from tenantflow_dev import Stack

CONFIG = StackConfig.from_env()
UNIT = Path(__file__).resolve().parent / "unit"


def _unit_only(config: pytest.Config) -> bool:
    """Whether every path this run collects is under tests/unit."""
    here = config.invocation_params.dir
    paths = [(here / arg.split("::")[0]).resolve() for arg in config.args]
    return bool(paths) and all(path == UNIT or UNIT in path.parents for path in paths)


def pytest_configure(config: pytest.Config) -> None:
    # NOTE: before any test module imports Prefect, which reads its settings once, on
    # import: every flow in the suite must talk to the stack's Prefect server (without
    # PREFECT_API_URL it would quietly start a temporary one) and every `get_settings()`
    # to the stack's poolers. Reading them creates the stack folder's secrets.
    if _unit_only(config):
        return
    os.environ.update(CONFIG.environment())
    os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
    # NOTE: the fixtures every stack area shares (`world`, `db_limit`, `parked_runs`) live
    # in one module, loaded only now that Prefect may be imported.
    config.pluginmanager.import_plugin("tests.world")


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    from tenantflow.settings import get_settings
    from tenantflow_dev import Stack

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
    import asyncpg

    conn = await asyncpg.connect(**stack.config.connect_parts(stack.config.pg_port, admin=True))
    try:
        yield conn
    finally:
        await conn.close()
