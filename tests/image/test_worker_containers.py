"""The process pool served by worker containers of the image, and one of them killed.

Two containers of the tenantflow-worker image (`--network host`, the tenant worker's
settings from a file of their own, never MIGRATION_DATABASE_URL) serve `tenantflow-process`
in place of the stack's own worker, which is stopped for each test and started again
after (`tenantflow_dev.worker_container.worker_containers`): a worker runs only the
deployments prefect.yaml declares for its own pool, so a pool of the test's own would run
no shard, and with the stack's worker polling too nothing would prove where shards ran.

The sweep itself runs here, as an operator's run (its shards go through the pool).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State, StateType

from flows.nightly_rollup import nightly_rollup
from tenantflow.automations import Alerts
from tenantflow.db import dispose_engines
from tenantflow.flow_environment import MIGRATION_ENV
from tenantflow.settings import get_settings
from tenantflow_dev import Stack
from tenantflow_dev.worker_container import WorkerContainer, worker_containers
from tests.deployments.test_alerts import (  # noqa: F401 (restore_automations: a fixture)
    TERMINAL,
    _bootstrap,
    _wait_for,
    restore_automations,
)
from tests.world import World, shard_runs, taken_slots

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.usefixtures("db_limit")]

CLIENTS = 600
SHARD_SIZE = 150
#: Above the image's flow-run heartbeat (30 s), so the runs still alive beat in time; the
#: stack's own window (90 s) would only make the test wait longer.
ZOMBIE_AFTER_S = 45
#: A shard the killed container had taken but not started yet (its worker dies between the
#: two) is marked Crashed this long after; the containers start a run in seconds.
STUCK_START_AFTER_S = 30
#: How long the first rollup of one client sleeps inside its transaction: its shard is
#: then surely Running, holding its slots, when the container is killed.
SLEEP_S = 20
#: A killed run's `tenantflow-db` slots are held by a lease nobody renews any more: the
#: server takes them back when it expires, at most DB_SLOT_LEASE_S after its last renewal
#: (the containers' own, shorter than the 300 s default, so the test waits less).
LEASE_S = 60


@pytest.fixture
async def sweep_clients(world: World) -> AsyncIterator[list[uuid.UUID]]:
    """CLIENTS more active clients with events today; afterwards, they and this loop's
    engines (the sweep's own guard ran here) are gone."""
    ids = await world.add_clients(CLIENTS, prefix="containers")
    try:
        yield ids
    finally:
        await world.remove_clients(ids)
        await dispose_engines()


@pytest.fixture
def shards(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Sweeps here split into shards of SHARD_SIZE clients."""
    monkeypatch.setenv("TENANT_SHARD_SIZE", str(SHARD_SIZE))
    get_settings.cache_clear()
    yield SHARD_SIZE
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def containers(stack: Stack, tmp_path: Path) -> Iterator[list[WorkerContainer]]:
    """Two worker containers of two flow runs each serve the pool, instead of the stack's
    worker: a sweep of four shards or more at once must use both."""
    prefix = f"tenantflow-test-worker-{uuid.uuid4().hex[:6]}"
    with worker_containers(
        stack.config,
        tmp_path,
        count=2,
        limit=2,
        prefix=prefix,
        settings={"DB_SLOT_LEASE_S": str(LEASE_S)},
    ) as running:
        yield running


async def _sweep(world: World, day: date, ids: list[uuid.UUID]) -> asyncio.Future[State]:
    """A sweep of the clients `ids` on `day`, started here as an operator's run."""
    sealed = await world.sealed_rollup(day, ids=ids)
    return asyncio.ensure_future(
        nightly_rollup(day=day, client_ids=ids, access_token=sealed, return_state=True)
    )


def _ran_on(runs: list[FlowRun], container: WorkerContainer) -> set[uuid.UUID]:
    return {r.id for r in runs if r.labels.get("prefect.worker.name") == container.worker_name}


async def test_a_sweep_in_shards_runs_on_both_worker_containers_every_client_once(
    world: World,
    sweep_clients: list[uuid.UUID],
    shards: int,
    containers: list[WorkerContainer],
) -> None:
    for container in containers:
        held = container.environment_names()
        assert "DATABASE_URL" in held and "SEAL_PRIVATE_KEYS" in held
        assert MIGRATION_ENV not in held, "a tenant worker container holds the owner's login"
    today = datetime.now(UTC).date()
    state = await (await _sweep(world, today, sweep_clients))
    assert state.is_completed(), state.message
    parent = state.state_details.flow_run_id
    assert parent is not None

    children = await shard_runs(parent)
    assert len(children) >= -(-CLIENTS // shards)
    assert all(c.state and c.state.is_completed() for c in children), [
        (c.name, c.state_name) for c in children
    ]
    took = {c.worker_name: _ran_on(children, c) for c in containers}
    assert all(took.values()), f"a container took no shard: {took}"
    assert set().union(*took.values()) == {c.id for c in children}
    # The containers' own logs say the same: each took exactly its shards.
    for container in containers:
        logged = container.submitted_runs() & {c.id for c in children}
        assert logged == took[container.worker_name], container.name

    await world.assert_rolled_up_once(sweep_clients, today)
    assert await taken_slots() == 0
    sys.stderr.write(
        "\nshards per container: "
        + ", ".join(f"{name}: {len(runs)}" for name, runs in took.items())
        + "\n"
    )


@pytest.mark.timeout(LEASE_S + 420)
async def test_a_worker_container_killed_mid_shard_its_run_crashed_and_the_shard_retried(
    world: World,
    stack: Stack,
    sweep_clients: list[uuid.UUID],
    shards: int,
    containers: list[WorkerContainer],
    restore_automations: None,  # noqa: F811
) -> None:
    await _bootstrap(
        stack, Alerts(zombie_after_s=ZOMBIE_AFTER_S, stuck_start_after_s=STUCK_START_AFTER_S)
    )
    today = datetime.now(UTC).date()
    slow = sweep_clients[0]
    first_call_sleeps = (
        f"IF nextval('public.{{name}}_calls') = 1 THEN PERFORM pg_sleep({SLEEP_S}); END IF;"
    )
    async with world.metrics_trigger(slow, first_call_sleeps, counter=True) as trigger:
        sweep = await _sweep(world, today, sweep_clients)
        # NOTE: the sequence is called when the client's first rollup is inside its
        # transaction: its shard run is Running and holds its slots.
        async with asyncio.timeout(300):
            while not await world.sql("fetchval", f"SELECT is_called FROM public.{trigger}_calls"):
                assert not sweep.done(), "the sweep ended before the slow client's rollup"
                await asyncio.sleep(0.2)
        doomed = await world.sql(
            "fetchval",
            "SELECT child_run_id FROM tenantflow_private.shard_grants WHERE $1 = ANY(client_ids)",
            slow,
        )
        async with get_client() as client:
            run = await client.read_flow_run(doomed)
            assert run.state_type == StateType.RUNNING, run.state
            (holder,) = [c for c in containers if doomed in _ran_on([run], c)]
            (survivor,) = [c for c in containers if c is not holder]

            killed = time.monotonic()
            await asyncio.to_thread(holder.kill)
            assert not holder.running()
            crashed = await _wait_for(client, doomed, TERMINAL, ZOMBIE_AFTER_S + 90)
            crashed_after = time.monotonic() - killed
        assert crashed.state_type == StateType.CRASHED, crashed.state
        assert f"No heartbeat from this flow run for {ZOMBIE_AFTER_S}s" in (
            crashed.state.message or ""
        )
        state = await sweep
    assert state.is_completed(), state.message
    parent = state.state_details.flow_run_id
    assert parent is not None

    children = await shard_runs(parent)
    grants = {
        g["child_run_id"]: set(g["client_ids"])
        for g in await world.sql(
            "fetch",
            "SELECT child_run_id, client_ids FROM tenantflow_private.shard_grants "
            "WHERE parent_run_id = $1",
            parent,
        )
    }
    # The killed shard was retried once, with all its clients (it never recorded an
    # outcome), on the container left; only runs of the killed container crashed.
    (retried,) = [c for c in children if slow in grants[c.id] and c.id != doomed]
    assert grants[retried.id] == grants[doomed]
    assert retried.state_type == StateType.COMPLETED, retried.state
    assert _ran_on([retried], survivor) == {retried.id}
    crashed_runs = {c.id for c in children if c.state_type == StateType.CRASHED}
    assert doomed in crashed_runs and crashed_runs <= _ran_on(children, holder)
    assert all(c.state_type == StateType.COMPLETED for c in children if c.id not in crashed_runs), [
        (c.name, c.state_name) for c in children
    ]

    await world.assert_rolled_up_once(sweep_clients, today)
    # Every slot comes back: the killed runs' leases expire, and the server reclaims them.
    last_taken = 0
    async with asyncio.timeout(LEASE_S + 120):
        while taken := await taken_slots():
            last_taken = taken
            await asyncio.sleep(2)
    freed_after = time.monotonic() - killed
    sys.stderr.write(
        f"\nworker container killed: its shard run Crashed {crashed_after:.1f}s after the "
        f"kill (window {ZOMBIE_AFTER_S}s), retried on {survivor.name}; the sweep Completed; "
        f"every slot back {freed_after:.0f}s after the kill ({last_taken} held till then)\n"
    )
