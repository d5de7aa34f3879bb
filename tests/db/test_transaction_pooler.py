"""The transaction-pooler engine, judged by its outcome through a real PgBouncer.

0 errors, 0 wrong results, 0 prepared statements left on the server connections,
with three OS processes sharing the pooler; and a guard proving that the pool really
is in transaction mode, since the seed's engine (asyncpg defaults) breaks on it.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg
import pytest

from tenantflow_dev import Stack
from tenantflow_dev.config import WORKER_DB_ROLE
from tests.db.load import LoadReport, run_load, seed_engine

pytestmark = pytest.mark.stack


async def _prepared_statements_on_server_connections(stack: Stack) -> int:
    """Count named prepared statements on the pooler's server connections.

    Holding as many transactions open at once as the pool has server connections
    makes the pooler hand out every one of them, so each one is sampled.
    """
    # NOTE: PgBouncer keeps a pool per login: sample the workers' one.
    parts = {
        **stack.config.connect_parts(stack.config.transaction_pooler_port),
        "user": WORKER_DB_ROLE,
        "password": stack.config.secrets.worker_password,
    }
    samples = stack.config.pooler_pool_size
    barrier = asyncio.Barrier(samples)

    async def sample() -> tuple[int, int]:
        conn = await asyncpg.connect(**parts, statement_cache_size=0)
        try:
            async with conn.transaction():
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                count = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
                await asyncio.wait_for(barrier.wait(), 5)
                return pid, count
        finally:
            await conn.close()

    results = await asyncio.gather(*(sample() for _ in range(samples)), return_exceptions=True)
    counts = dict(r for r in results if isinstance(r, tuple))
    assert len(counts) == samples, f"sampled {len(counts)} server connections: {results[:3]}"
    return sum(counts.values())


async def _reset_server_connections(stack: Stack) -> None:
    """Close the pooler's server connections (and whatever the seed engine left on them)."""
    conn = await asyncpg.connect(**stack.config.connect_parts(stack.config.pg_port, admin=True))
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE usename IN ('postgres', 'tenantflow_worker') AND pid <> pg_backend_pid()"
        )
        # NOTE: pg_terminate_backend only signals; wait until they are gone, so the
        # pooler does not hand out a connection that is still dying.
        for _ in range(100):
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE usename IN ('postgres', 'tenantflow_worker') "
                "AND backend_type = 'client backend'"
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def _load_from_processes(processes: int, pool_mode: str, units: int) -> LoadReport:
    async def one() -> LoadReport:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.db.load",
            "--pool-mode",
            pool_mode,
            "--units",
            str(units),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]
        return LoadReport.from_json(out.decode().strip().splitlines()[-1])

    total = LoadReport()
    for report in await asyncio.gather(*(one() for _ in range(processes))):
        total.merge(report)
    return total


@pytest.mark.slow
@pytest.mark.parametrize("pool_mode", ["queue", "null"])
async def test_three_processes_share_the_pooler_without_errors_or_leftovers(
    stack: Stack, pool_mode: str
) -> None:
    await _reset_server_connections(stack)
    report = await _load_from_processes(processes=3, pool_mode=pool_mode, units=200)

    assert report.units == 600
    assert dict(report.errors) == {}
    assert report.wrong == 0
    assert report.queries_ok == 600 * 5
    assert await _prepared_statements_on_server_connections(stack) == 0


@pytest.mark.slow
async def test_guard_the_pool_really_is_in_transaction_mode(stack: Stack) -> None:
    """The seed's engine (asyncpg defaults) breaks through this pooler; ours does not."""
    await _reset_server_connections(stack)
    engine = seed_engine(stack.config.database_url)
    try:
        seed = await run_load(engine, units=200)
    finally:
        await engine.dispose()
    leftovers = await _prepared_statements_on_server_connections(stack)
    await _reset_server_connections(stack)

    assert seed.failed + seed.wrong > 0, "asyncpg defaults survived: is the pool in session mode?"
    assert leftovers > 0

    from tenantflow.db import build_transaction_engine
    from tenantflow.settings import get_settings

    ours = build_transaction_engine(get_settings())
    try:
        report = await run_load(ours, units=200)
    finally:
        await ours.dispose()
    assert (report.failed, report.wrong, report.queries_ok) == (0, 0, 1000)
    assert await _prepared_statements_on_server_connections(stack) == 0
