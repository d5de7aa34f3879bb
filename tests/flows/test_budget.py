"""The connection budget: 1,000 clients, two flow runs in two processes at once."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from tenantflow.sealing import public_key, seal_access_token
from tests.world import World

pytestmark = [pytest.mark.stack, pytest.mark.slow]

CLIENTS = 1000
BUDGET = 8
FLOW_SLOTS = 4
_SERVER_CONNECTIONS = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE usename = 'tenantflow_worker' AND backend_type = 'client backend'"
)


@pytest.fixture
async def thousand_clients(world: World) -> AsyncIterator[list[uuid.UUID]]:
    ids = await world.add_clients(CLIENTS, prefix="budget", events=False)
    yield ids
    await world.remove_clients(ids)


@pytest.fixture
async def budget_limit() -> AsyncIterator[str]:
    name = f"tf-budget-{uuid.uuid4().hex[:8]}"
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=BUDGET)
        )
    yield name
    async with get_client() as client:
        await client.delete_global_concurrency_limit_by_name(name)


async def test_two_rollups_of_a_thousand_clients_stay_within_the_budget(
    world: World, thousand_clients: list[uuid.UUID], budget_limit: str, tmp_path: Path
) -> None:
    ids_file = tmp_path / "clients.txt"
    ids_file.write_text("\n".join(map(str, thousand_clients)))
    env = {
        **os.environ,
        "DB_CONCURRENCY_LIMIT": budget_limit,
        "DB_FLOW_SLOTS": str(FLOW_SLOTS),
        # NOTE: 2,000 "Finished in state Completed()" lines would only load the server.
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    admin = await world.admin()
    try:
        # Start from no server connections, so every one the poolers open is counted.
        # NOTE: pg_terminate_backend only signals: wait until the backends are gone.
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE usename = 'tenantflow_worker' AND pid <> pg_backend_pid()"
        )
        for _ in range(100):
            if await admin.fetchval(_SERVER_CONNECTIONS) == 0:
                break
            await asyncio.sleep(0.05)
        assert await admin.fetchval(_SERVER_CONNECTIONS) == 0
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.flows.rollup_process",
                str(ids_file),
                env={
                    **env,
                    # NOTE: a thousand ids: sealed by their digest (tenantflow.sealing).
                    # The run's only other parameter, `day`, is left empty (yesterday).
                    "TENANTFLOW_TEST_TOKEN": seal_access_token(
                        await world.token("operator"),
                        public_key(world.stack.config.secrets.seal_private_key),
                        flow="nightly-rollup",
                        client_ids=thousand_clients,
                        parameters={},
                    ),
                },
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        peak = 0
        waiters = [asyncio.create_task(p.communicate()) for p in procs]
        while not all(w.done() for w in waiters):
            connections = await admin.fetchval(_SERVER_CONNECTIONS)
            peak = max(peak, connections)
            await asyncio.sleep(0.02)
        outputs = [await w for w in waiters]
        metrics = await admin.fetchval(
            "SELECT count(*) FROM public.client_daily_metrics WHERE client_id = ANY($1::uuid[])",
            thousand_clients,
        )
    finally:
        await admin.close()

    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()[-3000:]
        assert out.decode().startswith("COMPLETED"), out.decode() + err.decode()[-3000:]
    assert metrics == CLIENTS
    assert 0 < peak <= BUDGET, f"peak {peak} server connections, budget {BUDGET}"
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(budget_limit)
    assert limit.active_slots == 0


async def _active_slots(name: str) -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(name)).active_slots


async def test_slots_held_by_a_cancelled_holder_are_given_back(budget_limit: str) -> None:
    from tenantflow.budget import database_slots
    from tenantflow.settings import get_settings

    settings = get_settings().model_copy(update={"db_concurrency_limit": budget_limit})
    held = asyncio.Event()

    async def hold() -> None:
        async with database_slots(3, settings=settings):
            held.set()
            await asyncio.sleep(3600)

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(held.wait(), 30)
    assert await _active_slots(budget_limit) == 3
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert await _active_slots(budget_limit) == 0


async def test_a_lease_that_cannot_be_renewed_stops_its_holder(
    budget_limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is taken away through the API (as an API holder can, or a server that
    lost it): the renewal fails, and the work holding the slots stops with a clear error
    instead of going on beyond the budget."""
    import tenantflow.budget as budget
    from tenantflow.settings import get_settings

    monkeypatch.setattr(budget, "_RENEW_AT", 0.01)  # of a 60 s lease: every 0.6 s
    monkeypatch.setattr(budget, "_RENEW_RETRY_S", 0.05)
    leases: list[uuid.UUID] = []
    request = budget._request_slots

    async def noted(*args: Any) -> Any:
        granted = await request(*args)
        leases.append(granted.lease_id)
        return granted

    monkeypatch.setattr(budget, "_request_slots", noted)
    settings = get_settings().model_copy(
        update={"db_concurrency_limit": budget_limit, "db_slot_lease_s": 60}
    )
    worked = 0
    with pytest.raises(budget.DatabaseSlotsLost, match="could not be renewed"):
        async with budget.database_slots(2, settings=settings):
            assert await _active_slots(budget_limit) == 2
            async with get_client() as client:
                await client.release_concurrency_slots_with_lease(leases[0])
            while True:
                worked += 1
                await asyncio.sleep(0.05)
    assert worked > 0
    assert await _active_slots(budget_limit) == 0


async def test_a_missing_limit_is_refused_before_anything_runs() -> None:
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

    from tenantflow.budget import database_slots
    from tenantflow.settings import get_settings

    settings = get_settings().model_copy(
        update={"db_concurrency_limit": f"tf-missing-{uuid.uuid4().hex[:8]}"}
    )
    with pytest.raises(ConcurrencySlotAcquisitionError, match="must be created"):
        async with database_slots(1, settings=settings):
            raise AssertionError("ran without slots")


async def test_transactions_outside_a_runs_slots_take_one_slot_at_a_time(
    budget_limit: str,
) -> None:
    """The guard's transactions, even when started at once (a seal's claim while the
    operator grant is read), hold one slot of the limit between them."""
    from tenantflow.budget import one_transaction_slot
    from tenantflow.settings import get_settings

    settings = get_settings().model_copy(update={"db_concurrency_limit": budget_limit})
    release, first_in = asyncio.Event(), asyncio.Event()
    entered: list[str] = []

    async def unit(name: str) -> None:
        async with one_transaction_slot(settings=settings):
            entered.append(name)
            first_in.set()
            await release.wait()

    first = asyncio.create_task(unit("first"))
    await asyncio.wait_for(first_in.wait(), 30)
    second = asyncio.create_task(unit("second"))
    await asyncio.sleep(0.5)
    assert entered == ["first"]
    assert await _active_slots(budget_limit) == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert entered == ["first", "second"]
    assert await _active_slots(budget_limit) == 0
