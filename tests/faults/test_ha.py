"""Faults of Prefect as several servers (the `ha` topology): an API replica SIGKILLed, Redis
killed, each in the middle of a sweep. They cost time, not clients, and no slot.

The stack must run the `ha` topology (`TENANTFLOW_PREFECT_TOPOLOGY=ha`, the second
stream's stack): on one server there is no replica to kill, and these tests fail saying
so, never skip. After each fault every client of the sweep has exactly one row, equal to
the totals counted straight from `client_events`, the run Completed and the
`tenantflow-db` limit has no slot taken (`_sweep_with_fault`); after Redis came back, the
scheduler still makes exactly one run per night and the zombie automation still crashes
a killed run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import DeploymentResponse
from prefect.server.schemas.schedules import CronSchedule

from tenantflow.project import declared_deployment, slot_of_key
from tenantflow_dev import Stack
from tenantflow_dev.load_balancer import LoadBalancer
from tenantflow_dev.prefect_server import PrefectApiReplica
from tenantflow_dev.redis_server import RedisServer
from tests.deployments.test_alerts import (  # noqa: F401 (fixtures)
    crash_a_killed_run,
    restore_automations,
    sleepy,
)
from tests.faults.test_restarts import (  # noqa: F401 (fixtures)
    _dispose,
    _sweep_with_fault,
    sweep_clients,
)
from tests.world import World

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.usefixtures("db_limit")]

#: How long the scheduler service may take to make a night's runs again (its loop for
#: recently updated deployments is 5 s, its main loop 60 s).
SCHEDULER_WITHIN_S = 150


@pytest.fixture(autouse=True)
def _ha(stack: Stack) -> None:
    """These faults need the several-server topology; on one server they fail, loudly."""
    assert stack.config.prefect_topology == "ha", (
        "tests/faults/test_ha.py needs the stack's Prefect as several servers: run it on a "
        "stack started with TENANTFLOW_PREFECT_TOPOLOGY=ha (`tenantflow-dev up --ha`; the "
        f"second stream's stack), not on {stack.config.stack_dir} "
        f"({stack.config.prefect_topology})"
    )


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


async def test_an_api_replica_killed_mid_sweep(
    world: World,
    stack: Stack,
    sweep_clients: list[uuid.UUID],  # noqa: F811
) -> None:
    replica = PrefectApiReplica(stack.config, 1)
    balancer = LoadBalancer(stack.config)
    replicas = len(stack.config.prefect_replica_ports)
    before = balancer.server_stats()
    at_kill: dict[str, dict[str, str]] = {}

    async def kill_and_restart() -> None:
        pid = replica.pid()
        assert pid is not None
        at_kill.update(balancer.server_stats())
        _sigkill(pid)
        # The sweep goes on through the other replica while this one is down ...
        for _ in range(100):
            if balancer.replicas_up()[0] < replicas:
                break
            await asyncio.sleep(0.1)
        assert balancer.replicas_up() == (replicas - 1, replicas)
        await asyncio.sleep(3)
        # ... and comes back into the balancer's rotation once restarted.
        assert await asyncio.to_thread(replica.start)

    await _sweep_with_fault(world, sweep_clients, kill_and_restart)
    assert (await asyncio.to_thread(replica.health)).healthy
    for _ in range(50):
        if balancer.replicas_up() == (replicas, replicas):
            break
        await asyncio.sleep(0.1)
    assert balancer.replicas_up() == (replicas, replicas)
    after = balancer.server_stats()
    # The killed replica was serving the stack's clients (the sweep among them) when it died.
    served = _counted(at_kill, before, "api-1", "stot")
    assert served > 0, "no request reached the replica between the sweep's start and its kill"
    sys.stderr.write(
        f"\napi-1 killed mid-sweep: from the sweep's start to the kill it had taken {served} "
        f"requests, api-2 {_counted(at_kill, before, 'api-2', 'stot')}; from the kill on, api-1 "
        f"{_counted(after, at_kill, 'api-1', 'stot')} (connection errors "
        f"{_counted(after, at_kill, 'api-1', 'econ')}, responses cut "
        f"{_counted(after, at_kill, 'api-1', 'eresp')}, retried "
        f"{_counted(after, at_kill, 'api-1', 'wretr')}, sent to api-2 instead "
        f"{_counted(after, at_kill, 'api-1', 'wredis')}), api-2 "
        f"{_counted(after, at_kill, 'api-2', 'stot')}\n"
    )


def _counted(
    later: dict[str, dict[str, str]], earlier: dict[str, dict[str, str]], server: str, field: str
) -> int:
    """How much HAProxy's counter `field` of `server` grew from `earlier` to `later`."""
    return int(later[server][field] or 0) - int(earlier[server][field] or 0)


async def test_redis_killed_mid_sweep_then_schedules_and_zombies_still_work(
    world: World,
    stack: Stack,
    sweep_clients: list[uuid.UUID],  # noqa: F811
    tmp_path: Path,
    sleepy: tuple[str, uuid.UUID],  # noqa: F811
    restore_automations: None,  # noqa: F811
) -> None:
    redis = RedisServer(stack.config)

    async def kill_and_restart() -> None:
        pid = redis.pid()
        assert pid is not None
        # NOTE: a crash, not a shutdown: what Redis had acknowledged (the slots' leases
        # among it) must come back from its append-only file.
        _sigkill(pid)
        await asyncio.sleep(3)
        assert await asyncio.to_thread(redis.start)

    await _sweep_with_fault(world, sweep_clients, kill_and_restart)
    assert (await asyncio.to_thread(redis.health)).healthy

    # The scheduler (in the services process, its docket in Redis) still makes exactly one
    # run of each coming night: its runs are deleted, and it makes them again.
    async with get_client() as client:
        rollup = await client.read_deployment_by_name("nightly-rollup/nightly-rollup")
        schedule_id, nights = _declared_schedule(rollup)
        deleted = await _scheduled_runs(client, rollup, schedule_id)
        assert deleted, "the scheduler had made no run of the coming nights"
        for run in deleted:
            await client.delete_flow_run(run.id)
        # NOTE: the deployment touched (its own description again), so the scheduler's
        # loop for recently updated deployments (every 5 s) makes the nights again, not
        # only its main loop (every 60 s): the same service, a minute sooner.
        await client.update_deployment(rollup.id, DeploymentUpdate(description=rollup.description))
        runs = await _wait_for_runs(client, rollup, schedule_id, at_least=len(deleted))
    slots = [_slot_of(run) for run in runs]
    assert len(set(slots)) == len(slots), f"nights with two runs: {sorted(slots)}"
    # Prefect's own reading of the schedule: the coming nights, from the next one on.
    assert slots == list(await nights.get_dates(len(slots))), "a night is missing, or an extra one"
    assert not {run.id for run in runs} & {run.id for run in deleted}

    # And the zombie automation (triggers and actions in the services process, events
    # through Redis) still marks a killed run Crashed.
    seen = await crash_a_killed_run(stack, tmp_path, sleepy)
    sys.stderr.write(f"\nafter Redis came back: {len(runs)} nights scheduled once each; {seen}\n")


def _declared_schedule(deployment: DeploymentResponse) -> tuple[uuid.UUID, CronSchedule]:
    """The server's id of the schedule prefect.yaml declares for `nightly-rollup`, and
    its nights as Prefect reads them."""
    declared = declared_deployment("nightly-rollup")
    assert declared is not None
    [mine] = declared.schedules
    [schedule] = [s for s in deployment.schedules if s.slug == mine.slug]
    return schedule.id, CronSchedule(cron=mine.cron, timezone=mine.timezone)


async def _scheduled_runs(
    client: PrefectClient, deployment: DeploymentResponse, schedule_id: uuid.UUID
) -> list[FlowRun]:
    """The Scheduled runs the scheduler made for `schedule_id`, the earliest night first."""
    runs = await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
        limit=200,
    )
    ours = [r for r in runs if r.auto_scheduled and r.created_by and r.created_by.id == schedule_id]
    return sorted(ours, key=_slot_of)


async def _wait_for_runs(
    client: PrefectClient,
    deployment: DeploymentResponse,
    schedule_id: uuid.UUID,
    *,
    at_least: int,
) -> list[FlowRun]:
    """The schedule's runs once the scheduler has made `at_least` of them again."""
    async with asyncio.timeout(SCHEDULER_WITHIN_S):
        while True:
            runs = await _scheduled_runs(client, deployment, schedule_id)
            if len(runs) >= at_least:
                # NOTE: one more loop of the scheduler, so a duplicate would have its chance.
                await asyncio.sleep(5)
                return await _scheduled_runs(client, deployment, schedule_id)
            await asyncio.sleep(2)


def _slot_of(run: FlowRun) -> datetime:
    slot = slot_of_key(run.idempotency_key)
    assert slot is not None, run.idempotency_key
    return slot
