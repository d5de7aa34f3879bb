"""Faults during a sweep: a pooler killed, PostgreSQL restarted. They cost time, not clients.

Faults come from the stack itself (SIGKILL, `pg_ctl restart -m immediate`), never from
mocking the code under test. After each, every client of the sweep has exactly one row,
equal to the totals counted straight from `client_events`, and the run Completed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime

import pytest

from flows.nightly_rollup import nightly_rollup
from tenantflow.db import dispose_engines
from tenantflow_dev import Stack
from tenantflow_dev.pgbouncer import PgBouncer
from tenantflow_dev.postgres import PG_BIN, Postgres
from tenantflow_dev.prefect_server import prefect_processes
from tests.world import World, taken_slots

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.usefixtures("db_limit")]

#: Enough for the sweep to be well under way, with most of it still to do, when the fault
#: lands (it lands at 50 rows; the check before it fails the test otherwise).
CLIENTS = 1000


@pytest.fixture(autouse=True)
async def _dispose() -> AsyncIterator[None]:
    yield
    await dispose_engines()


@pytest.fixture
async def sweep_clients(world: World) -> AsyncIterator[list[uuid.UUID]]:
    ids = await world.add_clients(CLIENTS, prefix="fault")
    yield ids
    await world.remove_clients(ids)


async def _rows(world: World, ids: list[uuid.UUID], day: date) -> int:
    count: int = await world.sql(
        "fetchval",
        "SELECT count(*) FROM public.client_daily_metrics "
        "WHERE client_id = ANY($1::uuid[]) AND day = $2",
        ids,
        day,
    )
    return count


async def _sweep_with_fault(
    world: World, ids: list[uuid.UUID], fault: Callable[[], Awaitable[None]]
) -> None:
    """Start a sweep, inject `fault` once it is under way, and check every figure after."""
    day = datetime.now(UTC).date()
    # NOTE: its own clients only: the shared stack may hold thousands more.
    sealed = await world.sealed_rollup(day, ids=ids)
    sweep = asyncio.ensure_future(
        nightly_rollup(day=day, client_ids=ids, access_token=sealed, return_state=True)
    )
    for _ in range(600):
        done = await _rows(world, ids, day)
        if done >= 50 or sweep.done():
            break
        await asyncio.sleep(0.05)
    assert not sweep.done() and done < len(ids), "the sweep finished before the fault"
    await fault()
    state = await sweep
    assert state.is_completed(), state.message
    await world.assert_rolled_up_once(ids, day)
    # The run gave back every slot of the budget it took, fault or not: a slot kept by a
    # lease the fault made the server forget would hold back every later run.
    taken = await taken_slots()
    assert taken == 0, f"{taken} slots still taken after the run"


async def test_the_transaction_pooler_killed_mid_sweep(
    world: World, stack: Stack, sweep_clients: list[uuid.UUID]
) -> None:
    pooler = PgBouncer(stack.config, "transaction")

    async def kill_and_restart() -> None:
        pid = pooler.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(3)
        await asyncio.to_thread(pooler.start)

    await _sweep_with_fault(world, sweep_clients, kill_and_restart)
    assert (await asyncio.to_thread(pooler.health)).healthy


async def test_postgres_restarted_immediately_mid_sweep(
    world: World, stack: Stack, sweep_clients: list[uuid.UUID]
) -> None:
    postgres = Postgres(stack.config)
    argv = [
        str(PG_BIN / "pg_ctl"),
        "-D",
        str(postgres.data),
        "-l",
        str(postgres.logfile),
        "-m",
        "immediate",
        "-w",
        "-t",
        "60",
        "restart",
    ]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]

    async def restart() -> None:
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr

    await _sweep_with_fault(world, sweep_clients, restart)
    assert (await asyncio.to_thread(postgres.health)).healthy


async def test_the_prefect_server_restarted_mid_sweep(
    world: World, stack: Stack, sweep_clients: list[uuid.UUID]
) -> None:
    # Every Prefect server process of the topology: the one server, or on `ha` each API
    # replica and the services process, all down at once.
    servers = prefect_processes(stack.config)

    async def restart() -> None:
        for server in servers:
            await asyncio.to_thread(server.stop)
        for server in servers:
            await asyncio.to_thread(server.start)

    await _sweep_with_fault(world, sweep_clients, restart)
