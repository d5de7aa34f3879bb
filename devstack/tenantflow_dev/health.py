"""How a part of the local stack reports itself: `Health`, and the database probe.

`tenantflow-dev status` prints one `Health` row per part; a PostgreSQL-speaking part
(the cluster, each PgBouncer) is healthy when a query through it answers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

__all__ = ["Health", "query_ok"]


@dataclass(frozen=True)
class Health:
    """One part's state: where it listens, whether it runs and answers, and why not."""

    name: str
    address: str
    running: bool
    healthy: bool
    pid: int | None
    detail: str = ""


def query_ok(parts: dict[str, object]) -> tuple[bool, str]:
    """Whether `SHOW server_version` answers through `parts` (asyncpg.connect arguments)."""

    async def probe() -> str:
        conn = await asyncpg.connect(**parts, timeout=3, statement_cache_size=0)
        try:
            version: str = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
        return version

    try:
        return True, f"PostgreSQL {asyncio.run(probe())}"
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        return False, type(error).__name__
