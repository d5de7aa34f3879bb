"""The scheduler is the project's own schedule, as `prefect.yaml` declares it, and nothing else.

Whoever reaches the Prefect API can patch a scheduled run's parameters, add a schedule to
a deployment or change one; each of those runs must need an operator's sealed token.
These use the stack's real `nightly-rollup` deployment and put back what they change.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import CronSchedule
from prefect.states import Completed, Running, Scheduled

from flows.nightly_rollup import nightly_rollup
from tenantflow.db import dispose_engines
from tenantflow.project import declared_deployment, slot_of_key
from tenantflow.rollup import default_day
from tenantflow.settings import Settings, get_settings
from tenantflow.tenancy import AccessDenied, ActorKind, TenantContext, authorize_run
from tenantflow.tenancy.guard import RunArguments
from tests.world import World

pytestmark = pytest.mark.stack

DECLARED = declared_deployment("nightly-rollup")


@pytest.fixture(autouse=True)
async def _dispose() -> AsyncIterator[None]:
    yield
    await dispose_engines()


@pytest.fixture
async def rollup(stack) -> DeploymentResponse:
    async with get_client() as client:
        return await client.read_deployment_by_name("nightly-rollup/nightly-rollup")


async def _scheduled_runs(
    client: PrefectClient, deployment: DeploymentResponse, schedule_id: uuid.UUID
) -> list[FlowRun]:
    """Runs the scheduler created for `schedule_id` (asking it to schedule now), the
    earliest slot first."""
    response = await client._client.post(
        f"/deployments/{deployment.id}/schedule", json={"max_runs": 2}
    )
    response.raise_for_status()
    runs = await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
        limit=200,
    )
    ours = [r for r in runs if r.auto_scheduled and r.created_by and r.created_by.id == schedule_id]
    return sorted(ours, key=lambda r: r.expected_start_time or datetime.max.replace(tzinfo=UTC))


def _at_the_slot() -> Settings:
    """Settings whose early tolerance covers the scheduled runs of the next two nights, so
    a test can act as their slot's time has come."""
    return get_settings().model_copy(update={"schedule_early_s": 3 * 86400.0})


async def _as_scheduler(
    run: FlowRun,
    *,
    received: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[TenantContext]:
    """The guard in `run`, as if its flow had received `received` (by default the run's
    stored parameters) at its slot (or at the time `settings` say)."""
    return await authorize_run(
        action="nightly-rollup",
        mode="service",
        access_token=None,
        client_ids=None,
        flow_run_id=run.id,
        arguments=RunArguments.of(
            nightly_rollup.fn, run.parameters if received is None else received
        ),
        settings=settings or _at_the_slot(),
    )


def _declared_schedule_id(deployment: DeploymentResponse) -> uuid.UUID:
    assert DECLARED is not None
    [slug] = [s.slug for s in DECLARED.schedules]
    return next(s.id for s in deployment.schedules if s.slug == slug)


async def _next_night(rollup: DeploymentResponse) -> FlowRun:
    """The declared schedule's next run (the scheduler asked to schedule now)."""
    async with get_client() as client:
        [run, *_] = await _scheduled_runs(client, rollup, _declared_schedule_id(rollup))
    return run


async def test_the_declared_schedule_is_the_scheduler(
    world: World, rollup: DeploymentResponse
) -> None:
    async with get_client() as client:
        runs = await _scheduled_runs(client, rollup, _declared_schedule_id(rollup))
    assert runs, "the declared schedule created no run"
    contexts = await _as_scheduler(runs[0])
    assert {c.actor.kind for c in contexts} == {ActorKind.SCHEDULER}
    assert {world.clients["a"], world.clients["b"]} <= {c.client_id for c in contexts}


async def test_a_patched_scheduled_run_is_not_the_scheduler(
    world: World, rollup: DeploymentResponse
) -> None:
    run = await _next_night(rollup)
    # The attack: parameters patched in before the run starts (the flow receives them),
    # and patched back to the declared ones once it runs. The guard decides on what the
    # flow received; the run's stored parameters are the declared ones again.
    patched = {"client_ids": [str(world.clients["a"])], "day": "2020-01-01"}
    with pytest.raises(AccessDenied, match="started with other parameters than schedule"):
        await _as_scheduler(run, received=patched)
    async with get_client() as client:
        assert (await client.read_flow_run(run.id)).parameters == {}
    reason = await world.sql(
        "fetchval",
        "SELECT reason FROM public.audit_log WHERE flow_run_id = $1 AND outcome = 'denied'",
        run.id,
    )
    assert "client_ids" in reason and "day" in reason


async def test_a_schedule_added_through_the_api_is_not_the_scheduler(
    world: World, rollup: DeploymentResponse
) -> None:
    async with get_client() as client:
        [added] = await client.create_deployment_schedules(
            rollup.id,
            [
                DeploymentScheduleCreate(
                    schedule=CronSchedule(cron="0 * * * *", timezone="UTC"),
                    active=True,
                    slug="added-through-the-api",
                )
            ],
        )
        try:
            runs = await _scheduled_runs(client, rollup, added.id)
            assert runs, "the added schedule created no run"
            with pytest.raises(AccessDenied, match="does not declare"):
                await _as_scheduler(runs[0])
        finally:
            # NOTE: deleting a schedule deletes the runs it scheduled, too.
            await client.delete_deployment_schedule(rollup.id, added.id)


async def test_a_declared_schedule_changed_through_the_api_is_not_the_scheduler(
    world: World, rollup: DeploymentResponse
) -> None:
    schedule_id = _declared_schedule_id(rollup)
    original = next(s for s in rollup.schedules if s.id == schedule_id)
    async with get_client() as client:
        # NOTE: changing a schedule replaces the runs it had scheduled.
        await client.update_deployment_schedule(
            rollup.id, schedule_id, schedule=CronSchedule(cron="*/5 * * * *", timezone="UTC")
        )
        try:
            [run, *_] = await _scheduled_runs(client, rollup, schedule_id)
            with pytest.raises(AccessDenied, match="was changed through the Prefect API"):
                await _as_scheduler(run)
        finally:
            await client.update_deployment_schedule(
                rollup.id, schedule_id, schedule=original.schedule
            )
        # Back as declared, its runs are the scheduler's again.
        [run, *_] = await _scheduled_runs(client, rollup, schedule_id)
        assert (await _as_scheduler(run))[0].actor.kind is ActorKind.SCHEDULER


def _slot_of(run: FlowRun) -> datetime:
    slot = slot_of_key(run.idempotency_key)
    assert slot is not None, run.idempotency_key
    return slot


async def test_a_scheduled_run_is_the_scheduler_only_at_its_slot(
    world: World, rollup: DeploymentResponse
) -> None:
    run = await _next_night(rollup)
    slot = _slot_of(run)
    assert slot == run.expected_start_time and slot > datetime.now(UTC)
    # Now, well before its slot, with the production tolerance: refused, naming the slot.
    with pytest.raises(AccessDenied, match=f"for the {slot:%Y-%m-%d %H:%M} .* before it"):
        await _as_scheduler(run, settings=get_settings())
    # At its slot it is the scheduler, and its day is the night before its slot, whatever
    # the wall clock says.
    contexts = await _as_scheduler(run)
    assert contexts[0].actor.slot == slot
    assert default_day(contexts) == slot.date() - timedelta(days=1)


async def test_a_scheduled_run_moved_to_now_is_still_early_for_its_slot(
    world: World, rollup: DeploymentResponse
) -> None:
    # NOTE: a night whose slot is over an hour away (the next one is not, in the hour
    # before 02:15 UTC; the schedule makes two nights ahead).
    async with get_client() as client:
        runs = await _scheduled_runs(client, rollup, _declared_schedule_id(rollup))
    run = next(r for r in runs if _slot_of(r) > datetime.now(UTC) + timedelta(hours=1, minutes=5))
    slot = _slot_of(run)
    async with get_client() as client:
        await client.set_flow_run_state(
            run.id, Scheduled(scheduled_time=datetime.now(UTC)), force=True
        )
        try:
            moved = await client.read_flow_run(run.id)
            assert moved.next_scheduled_start_time is not None
            assert moved.next_scheduled_start_time < slot - timedelta(hours=1)
            # Its scheduled time moved; the slot it is for (its idempotency key) did not.
            with pytest.raises(AccessDenied, match="before it; the scheduler runs only at"):
                await _as_scheduler(moved, settings=get_settings())
        finally:
            await client.set_flow_run_state(run.id, Scheduled(scheduled_time=slot), force=True)


async def test_a_scheduled_run_that_ended_once_does_not_run_again(
    world: World, rollup: DeploymentResponse
) -> None:
    run = await _next_night(rollup)
    slot = _slot_of(run)
    async with get_client() as client:
        try:
            assert (await _as_scheduler(run))[0].actor.kind is ActorKind.SCHEDULER
            states: list[State[Any]] = [Running(), Completed(), Scheduled(scheduled_time=slot)]
            for state in states:
                await client.set_flow_run_state(run.id, state, force=True)
            with pytest.raises(AccessDenied, match="already ended once \\(Completed at"):
                await _as_scheduler(run)
        finally:
            # NOTE: its state history cannot be undone; without it, the scheduler makes the
            # slot's run again (the idempotency key is free once more).
            await client.delete_flow_run(run.id)
        runs = await _scheduled_runs(client, rollup, _declared_schedule_id(rollup))
    [again] = [r for r in runs if _slot_of(r) == slot]
    assert again.id != run.id
    reasons = await world.sql(
        "fetch",
        "SELECT outcome, reason FROM public.audit_log WHERE flow_run_id = $1 ORDER BY id",
        run.id,
    )
    # (Other tests of this run's slot were admitted before; this one's last word is no.)
    assert "allowed" in [r["outcome"] for r in reasons[:-1]]
    assert reasons[-1]["outcome"] == "denied" and "already ended once" in reasons[-1]["reason"]


async def test_the_guard_reads_the_arguments_the_flow_received_not_the_stored_ones(
    stack: object,
) -> None:
    from prefect import flow

    from tenantflow.tenancy import current_flow_run_id
    from tenantflow.tenancy.guard import received_arguments

    @flow(name="received-arguments-probe", persist_result=False)
    async def probe(day: str | None = None, client_ids: list[str] | None = None) -> Any:
        run_id = current_flow_run_id()
        async with get_client() as client:
            # What an API holder does once the run is Running: patch the parameters back.
            await client.update_flow_run(run_id, parameters={})
            stored = (await client.read_flow_run(run_id)).parameters
        arguments = received_arguments(run_id)
        assert arguments is not None
        return stored, dict(arguments.received), dict(arguments.defaults)

    stored, received, defaults = await probe(day="2020-01-01")
    assert stored == {}
    assert received == {"day": "2020-01-01", "client_ids": None}
    assert defaults == {"day": None, "client_ids": None}
    # Outside that flow run, nothing is taken for its arguments.
    assert received_arguments(uuid.uuid4()) is None
