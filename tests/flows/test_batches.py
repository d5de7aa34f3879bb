"""Batched tenant work: a task run per batch, a transaction and an outcome per client."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.nightly_rollup import nightly_rollup
from tenantflow.db import dispose_engines
from tests.world import World

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("db_limit")]

#: As many batches as a 2,000-client sweep in batches of 200 (more batches than the
#: flow's database slots), from half the clients.
CLIENTS = 1000
BATCH = 100


@pytest.fixture(autouse=True)
async def _dispose() -> AsyncIterator[None]:
    yield
    await dispose_engines()


@pytest.fixture
async def many_clients(world: World) -> AsyncIterator[list[uuid.UUID]]:
    ids = await world.add_clients(CLIENTS, prefix="batch")
    yield ids
    await world.remove_clients(ids)


async def _metrics(world: World, clients: list[uuid.UUID]) -> dict[uuid.UUID, tuple]:
    rows = await world.sql(
        "fetch",
        "SELECT client_id, events, revenue, computed_at FROM public.client_daily_metrics "
        "WHERE client_id = ANY($1::uuid[]) AND day = $2",
        clients,
        datetime.now(UTC).date(),
    )
    return {row["client_id"]: (row["events"], row["revenue"], row["computed_at"]) for row in rows}


async def _task_runs(run_id: uuid.UUID, at_least: int = 1) -> list:
    """The run's task runs, once the server has recorded them (it does so from events,
    a moment after the run)."""
    async with get_client() as client:
        for _ in range(150):
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200
            )
            if len(runs) >= at_least and all(r.state and r.state.is_final() for r in runs):
                return runs
            await asyncio.sleep(0.2)
    return runs


async def test_a_sweep_runs_a_task_run_per_batch_and_every_client_once(
    world: World, many_clients: list[uuid.UUID], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tenantflow.settings import get_settings

    monkeypatch.setenv("TENANT_BATCH_SIZE", str(BATCH))
    get_settings.cache_clear()
    today = datetime.now(UTC).date()
    clients = [*many_clients, world.clients["a"]]

    async def sweep() -> tuple[dict, uuid.UUID]:
        # NOTE: its own clients: the shared stack may hold thousands more (a sweep of every
        # active client would then take the shard path).
        sealed = await world.sealed_rollup(today, ids=clients)
        state = await nightly_rollup(
            day=today, client_ids=clients, access_token=sealed, return_state=True
        )
        assert state.is_completed(), state.message
        run_id = state.state_details.flow_run_id
        assert run_id is not None
        return await state.aresult(), run_id

    try:
        result, run_id = await sweep()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    first = await _metrics(world, clients)
    expected = await world.day_totals(clients, today)
    assert {c: (e, r) for c, (e, r, _) in first.items()} == expected
    assert result["clients"] == len(clients)

    expected_batches = -(-result["clients"] // BATCH)
    task_runs = await _task_runs(run_id, at_least=expected_batches)
    batches = [t for t in task_runs if t.name.startswith("rollup[")]
    assert len(batches) == expected_batches
    assert len(task_runs) <= result["clients"] / 100 + 10
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    table = json.loads(str(next(a for a in artifacts if a.key == "nightly-rollup").data))
    rows = {row["client"].rsplit("(", 1)[1].rstrip(")"): row for row in table}
    assert all(rows[str(c)]["outcome"] == "ok" for c in clients)
    assert rows[str(many_clients[5])]["events"] == expected[many_clients[5]][0]
    assert "nightly-rollup-failed-clients" not in {a.key for a in artifacts}

    # A second run of the same day changes no figure.
    await sweep()
    second = await _metrics(world, clients)
    assert {c: v[:2] for c, v in second.items()} == {c: v[:2] for c, v in first.items()}


async def test_a_transient_fault_is_retried_for_that_client_alone(world: World) -> None:
    """The first upsert of client `a` fails with a serialization failure (40001): that
    client is retried and completes; `b` never notices."""
    flaky, fine = world.clients["a"], world.clients["b"]
    today = datetime.now(UTC).date()
    first_call_fails = (
        "IF nextval('public.{name}_calls') = 1 THEN "
        "RAISE EXCEPTION 'injected serialization failure' USING ERRCODE = '40001'; END IF;"
    )
    async with world.metrics_trigger(flaky, first_call_fails, counter=True) as name:
        state = await nightly_rollup(
            day=today,
            client_ids=[flaky, fine],
            access_token=await world.sealed_rollup(today, clients=["a", "b"]),
            return_state=True,
        )
        calls = await world.sql("fetchval", f"SELECT last_value FROM public.{name}_calls")
    assert state.is_completed(), state.message
    assert calls == 2  # the failed attempt, then the retry
    metrics = await _metrics(world, [flaky, fine])
    expected = await world.day_totals([flaky, fine], today)
    assert {c: (e, r) for c, (e, r, _) in metrics.items()} == expected


async def test_a_failing_client_leaves_its_batch_completed(world: World) -> None:
    today = datetime.now(UTC).date()
    async with world.metrics_trigger(world.clients["a"], "RAISE EXCEPTION 'refused';"):
        state = await nightly_rollup(
            day=today,
            client_ids=[world.clients["a"], world.clients["b"]],
            access_token=await world.sealed_rollup(today, clients=["a", "b"]),
            return_state=True,
        )
    assert state.is_failed() and str(world.clients["a"]) in state.message
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    # One batch held both clients: the batch's task run itself completed.
    [batch] = [t for t in await _task_runs(run_id) if t.name.startswith("rollup[")]
    assert batch.state.is_completed()
