"""The scheduler is the project's own schedule, as `prefect.yaml` declares it, and nothing else.

Whoever reaches the Prefect API can patch a scheduled run's parameters, add a schedule to
a deployment or change one; each of those runs must need an operator's sealed token.
These use the stack's real `nightly-rollup` deployment and put back what they change.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import CronSchedule

from tenantflow.db import dispose_engines
from tenantflow.project import declared_deployment
from tenantflow.tenancy import AccessDenied, ActorKind, TenantContext, authorize_run
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
    """Runs the scheduler created for `schedule_id` (asking it to schedule now)."""
    response = await client._client.post(
        f"/deployments/{deployment.id}/schedule", json={"max_runs": 2}
    )
    response.raise_for_status()
    runs = await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
        limit=200,
    )
    return [r for r in runs if r.auto_scheduled and r.created_by and r.created_by.id == schedule_id]


async def _as_scheduler(run: FlowRun) -> list[TenantContext]:
    return await authorize_run(
        action="nightly-rollup",
        mode="service",
        access_token=None,
        client_ids=None,
        flow_run_id=run.id,
    )


def _declared_schedule_id(deployment: DeploymentResponse) -> uuid.UUID:
    assert DECLARED is not None
    [slug] = [s.slug for s in DECLARED.schedules]
    return next(s.id for s in deployment.schedules if s.slug == slug)


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
    async with get_client() as client:
        [run, *_] = await _scheduled_runs(client, rollup, _declared_schedule_id(rollup))
        patched = {"client_ids": [str(world.clients["a"])], "day": "2020-01-01"}
        await client.update_flow_run(run.id, parameters=patched)
        try:
            with pytest.raises(AccessDenied, match="parameters differ from schedule"):
                await _as_scheduler(run)
        finally:
            await client.update_flow_run(run.id, parameters=run.parameters)
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
