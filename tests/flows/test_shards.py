"""Shards: a large sweep runs as child flow runs on every worker of the pool, within budget.

The stack's own worker is stopped for the sweep test and two workers (two flow runs
each at most) serve the pool instead, so both must take shards; it is started again
afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import PrefectHTTPStatusError

from flows.nightly_rollup import nightly_rollup
from tenantflow.db import dispose_engines
from tenantflow.settings import get_settings
from tenantflow.shards import SHARD_DEPLOYMENT
from tenantflow_dev import Stack
from tenantflow_dev.worker import LocalWorker
from tests.world import World, shard_runs

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.usefixtures("db_limit")]

CLIENTS = 600
SHARD_SIZE = 150
_WORKER_CONNECTIONS = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE usename = 'tenantflow_worker' AND backend_type = 'client backend'"
)


@pytest.fixture(autouse=True)
async def _dispose() -> AsyncIterator[None]:
    yield
    await dispose_engines()


@pytest.fixture
async def sweep_clients(world: World) -> AsyncIterator[list[uuid.UUID]]:
    ids = await world.add_clients(CLIENTS, prefix="shard")
    yield ids
    await world.remove_clients(ids)


@pytest.fixture
def two_workers(stack: Stack, tmp_path: Path) -> Iterator[list[LocalWorker]]:
    """The pool served by two workers of two runs each, instead of the stack's worker."""
    main = LocalWorker(stack.config)
    main.stop()
    workers = [
        LocalWorker(
            dataclasses.replace(stack.config),
            worker_name=f"tenantflow-shard-test-{n}",
            root=tmp_path / f"worker-{n}",
            limit=2,
        )
        for n in (1, 2)
    ]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        for worker in workers:
            worker.stop()
        main.start()


async def test_a_sweep_in_shards_runs_on_both_workers_every_client_once_within_budget(
    world: World,
    sweep_clients: list[uuid.UUID],
    two_workers: list[LocalWorker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    today = datetime.now(UTC).date()
    budget = get_settings().db_concurrency_slots
    monkeypatch.setenv("TENANT_SHARD_SIZE", str(SHARD_SIZE))
    get_settings.cache_clear()
    admin = await world.admin()
    peak = 0
    try:
        sealed = await world.sealed_rollup(today, ids=sweep_clients)
        sweep = asyncio.ensure_future(
            nightly_rollup(
                day=today, client_ids=sweep_clients, access_token=sealed, return_state=True
            )
        )
        while not sweep.done():
            peak = max(peak, await admin.fetchval(_WORKER_CONNECTIONS))
            await asyncio.sleep(0.02)
        state = await sweep
    finally:
        await admin.close()
        monkeypatch.undo()
        get_settings.cache_clear()
    assert state.is_completed(), state.message
    parent = state.state_details.flow_run_id
    assert parent is not None

    children = await shard_runs(parent)
    assert len(children) >= -(-CLIENTS // SHARD_SIZE)
    assert all(c.state and c.state.is_completed() for c in children)
    ran_on = {c.labels.get("prefect.worker.name") for c in children}
    assert ran_on == {w.worker_name for w in two_workers}, ran_on
    assert 0 < peak <= budget, f"peak {peak} server connections, budget {budget}"

    # Every client was delegated once, and rolled up once, with the right figures.
    grants = await world.sql(
        "fetch",
        "SELECT child_run_id, client_ids FROM tenantflow_private.shard_grants "
        "WHERE parent_run_id = $1",
        parent,
    )
    delegated = [c for g in grants for c in g["client_ids"]]
    assert len(delegated) == len(set(delegated))
    assert set(sweep_clients) <= set(delegated)
    assert {g["child_run_id"] for g in grants} == {c.id for c in children}
    await world.assert_rolled_up_once(sweep_clients, today)
    # Each shard's decision is audited and names its parent.
    reasons = await world.sql(
        "fetch",
        "SELECT flow_run_id, reason FROM public.audit_log "
        "WHERE flow_run_id = ANY($1::uuid[]) AND outcome = 'allowed'",
        [c.id for c in children],
    )
    assert {r["flow_run_id"] for r in reasons} == {c.id for c in children}
    assert all(str(parent) in r["reason"] for r in reasons)


async def _final(run_id: uuid.UUID) -> FlowRun:
    async with get_client() as client:
        async with asyncio.timeout(120):
            while True:
                run = await client.read_flow_run(run_id)
                if run.state and run.state.is_final():
                    return run
                await asyncio.sleep(0.5)


async def test_a_shard_run_made_through_the_api_is_refused(world: World, stack: Stack) -> None:
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(SHARD_DEPLOYMENT)
        forged = await client.create_flow_run_from_deployment(deployment.id, parameters={})
        # Clients cannot be handed to a shard: it takes no parameters at all.
        try:
            handed = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"client_ids": [str(world.clients["a"])]}
            )
        except PrefectHTTPStatusError as refused:
            assert refused.response.status_code in (409, 422)
            handed = None
    run = await _final(forged.id)
    assert run.state.is_failed(), run.state
    assert "no shard grant for this flow run" in (run.state.message or "")
    audited = await world.sql(
        "fetch",
        "SELECT outcome, reason FROM public.audit_log WHERE flow_run_id = $1",
        forged.id,
    )
    assert [r["outcome"] for r in audited] == ["denied"]
    if handed is not None:
        other = await _final(handed.id)
        assert not other.state.is_completed(), other.state
    touched = await world.sql(
        "fetchval",
        "SELECT count(*) FROM public.client_daily_metrics WHERE client_id = ANY($1::uuid[])",
        list(world.clients.values()),
    )
    assert touched == 0
