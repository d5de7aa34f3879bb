"""The worker's housekeeping against what an API holder leaves behind, on the real stack.

Each test calls `housekeep_once` directly (the worker need not run it) and keeps to its own
runs and limits: the stack, its real nightly schedule and `tenantflow-db` are shared. Runs
the housekeeper may rewrite or delete carry a tag of the test's own (`config.tags`); a
deployment with a schedule of its own lives in a temporary project whose `prefect.yaml`
declares it, and has no work pool, so no worker ever runs its runs. Events are read back
through the API (`/events/filter`), and one alert through a receiver in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import (
    DeploymentScheduleCreate,
    DeploymentUpdate,
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterIdempotencyKey,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.client.schemas.schedules import CronSchedule
from prefect.events.filters import EventFilter, EventIDFilter
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Failed, Scheduled

from tenantflow.automations import AUTOMATIONS, HOUSEKEEPING_EVENTS, housekeeping_automation
from tenantflow.housekeeping import (
    SPENT,
    Finding,
    HousekeepingConfig,
    HousekeepingState,
    housekeep_once,
    schedule_slots,
)
from tenantflow.project import declared_deployment, scheduler_key
from tenantflow.tenancy.run_token import REDACTED
from tests.deployments.test_alerts import Receiver
from tests.world import World

pytestmark = [pytest.mark.stack]

PROJECT = Path(__file__).resolve().parents[2]
CRON = "30 3 * * *"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def tag() -> str:
    return f"hk-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def client() -> AsyncIterator[PrefectClient]:
    async with get_client() as client:
        yield client


@pytest.fixture
async def cleanup(client: PrefectClient) -> AsyncIterator[list[Callable[[], Any]]]:
    """Coroutine functions run at teardown, last added first (runs, deployments, limits)."""
    undo: list[Callable[[], Any]] = []
    yield undo
    for step in reversed(undo):
        with contextlib.suppress(ObjectNotFound):
            await step()


def _forget(client: PrefectClient, run_id: uuid.UUID) -> Callable[[], Any]:
    return lambda: client.delete_flow_run(run_id)


async def _gone(client: PrefectClient, run_id: uuid.UUID) -> bool:
    try:
        await client.read_flow_run(run_id)
    except ObjectNotFound:
        return True
    return False


@dataclass
class OwnProject:
    """A temporary project declaring one scheduled deployment, and that deployment in
    Prefect (no work pool: nothing runs its runs)."""

    folder: Path
    name: str
    slug: str
    deployment_id: uuid.UUID
    schedule_id: uuid.UUID
    flow_id: uuid.UUID

    def config(self, tag: str, **changes: Any) -> HousekeepingConfig:
        return HousekeepingConfig(project_dir=self.folder, tags=(tag,), limits=(), **changes)

    def slots(self, start: datetime, end: datetime) -> list[datetime]:
        declared = declared_deployment(self.name, self.folder)
        assert declared is not None
        return schedule_slots(declared.schedules[0], start, end)


@pytest.fixture
async def own_project(
    tmp_path: Path, tag: str, client: PrefectClient, cleanup: list[Callable[[], Any]]
) -> OwnProject:
    name, slug = f"{tag}-nightly", f"{tag}-0330-utc"
    (tmp_path / "prefect.yaml").write_text(
        f"""\
name: housekeeping-test
deployments:
  - name: {name}
    entrypoint: flows/none.py:none
    parameters: {{}}
    schedules:
      - cron: "{CRON}"
        timezone: UTC
        slug: {slug}
        active: true
"""
    )
    flow_id = await client.create_flow_from_name(f"tenantflow-housekeeping-{tag}")
    cleanup.append(lambda: client.delete_flow(flow_id))
    # NOTE: the schedule starts paused, as an API holder can leave it: the tests decide
    # when the scheduler may create runs.
    deployment_id = await client.create_deployment(
        flow_id=flow_id,
        name=name,
        schedules=[
            DeploymentScheduleCreate(
                schedule=CronSchedule(cron=CRON, timezone="UTC"), active=False, slug=slug
            )
        ],
    )
    cleanup.append(lambda: client.delete_deployment(deployment_id))
    deployment = await client.read_deployment(deployment_id)
    (schedule,) = deployment.schedules
    return OwnProject(tmp_path, name, slug, deployment_id, schedule.id, flow_id)


async def _events(client: PrefectClient, ids: list[uuid.UUID], seconds: float = 60) -> list[Any]:
    """The events of these ids once the server has stored all of them (it writes in batches)."""
    async with asyncio.timeout(seconds):
        while True:
            page = await client.read_events(
                filter=EventFilter(id=EventIDFilter(id=ids)), limit=len(ids)
            )
            if len(page.events) == len(ids):
                return list(page.events)
            await asyncio.sleep(0.5)


async def _scheduled_for(
    client: PrefectClient, project: OwnProject, slots: list[datetime], seconds: float = 120
) -> dict[datetime, FlowRun]:
    """Wait until Prefect's scheduler has created a run for each of `slots`; by slot."""
    keys = {scheduler_key(project.deployment_id, project.schedule_id, s): s for s in slots}
    async with asyncio.timeout(seconds):
        while True:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[project.deployment_id]),
                    idempotency_key=FlowRunFilterIdempotencyKey(any_=list(keys)),
                )
            )
            found = {keys[r.idempotency_key or ""]: r for r in runs if r.auto_scheduled}
            if len(found) == len(slots):
                return found
            await asyncio.sleep(0.5)


async def _touch(client: PrefectClient, deployment_id: uuid.UUID) -> None:
    """Make Prefect's scheduler look at the deployment within seconds: its loop for
    deployments updated a moment ago (every 5 s) instead of its main one (every 60 s).
    NOTE: an update also deletes the deployment's future auto-scheduled runs, which the
    scheduler then creates again."""
    await client.update_deployment(
        deployment_id, DeploymentUpdate(description=f"touched {uuid.uuid4().hex[:6]}")
    )


async def _scheduled_ids(client: PrefectClient, deployment_id: uuid.UUID) -> set[uuid.UUID]:
    """The runs of a deployment that Prefect's scheduler created."""
    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
    )
    return {run.id for run in runs if run.auto_scheduled}


def _only(findings: tuple[Finding, ...], event: str) -> list[Finding]:
    return [finding for finding in findings if finding.event == event]


def test_the_alert_sends_every_housekeeping_event_as_it_is() -> None:
    block = uuid.uuid4()
    automation = housekeeping_automation(block)
    assert automation.name == AUTOMATIONS["housekeeping"]
    assert isinstance(automation.trigger, EventTrigger)
    assert automation.trigger.posture == Posture.Reactive
    assert automation.trigger.expect == set(HOUSEKEEPING_EVENTS.values())
    (notify,) = automation.actions
    assert notify.block_document_id == block
    assert "event.payload.subject" in notify.subject
    assert "event.payload.message" in notify.body


# --------------------------------------------------------------------------- run parameters


async def test_finished_runs_lose_their_seal_waiting_runs_keep_it_plain_tokens_go_at_once(
    world: World, tag: str, client: PrefectClient, cleanup: list[Callable[[], Any]]
) -> None:
    report_deployment = await client.read_deployment_by_name("client-report/client-report")
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"])
    plain = await world.token("member_a")
    later: State[Any] = Scheduled(scheduled_time=datetime.now(UTC) + timedelta(days=1))

    async def report_run(access_token: str) -> FlowRun:
        run = await client.create_flow_run_from_deployment(
            report_deployment.id,
            parameters={
                "client_id": str(world.clients["a"]),
                "period_start": "2026-11-01",
                "period_end": "2026-11-30",
                "access_token": access_token,
            },
            state=later,
            tags=[tag],
        )
        cleanup.append(_forget(client, run.id))
        return run

    cancelled, failed, waiting, patched = [await report_run(sealed) for _ in range(4)]
    # A plain JWT patched into a Scheduled run's parameters (the schema is not checked then).
    await client.update_flow_run(
        patched.id, parameters={**patched.parameters, "access_token": plain}
    )
    # The same values in runs of a deployment the project does not declare.
    other_flow = await client.create_flow_from_name(f"tenantflow-undeclared-{tag}")
    cleanup.append(lambda: client.delete_flow(other_flow))
    other = await client.create_deployment(flow_id=other_flow, name="undeclared")
    foreign_sealed = await client.create_flow_run_from_deployment(
        other, parameters={"access_token": sealed}, state=later, tags=[tag]
    )
    foreign_plain = await client.create_flow_run_from_deployment(
        other, parameters={"access_token": plain}, state=later, tags=[tag]
    )

    config = HousekeepingConfig(project_dir=PROJECT, tags=(tag,), limits=())
    state = HousekeepingState()
    first = await housekeep_once(config=config, state=state)
    assert first.full_pass
    assert first.redacted == (patched.id,)
    assert first.spent == ()

    # Cancelled before it ever started, as an attacker would leave a victim's run; and one
    # that failed. Both are found by the next, recent-only pass.
    await client.set_flow_run_state(cancelled.id, Cancelled())
    await client.set_flow_run_state(failed.id, Failed(), force=True)
    await client.set_flow_run_state(foreign_sealed.id, Cancelled())
    second = await housekeep_once(config=config, state=state)
    assert not second.full_pass
    assert set(second.spent) == {cancelled.id, failed.id}
    assert second.redacted == ()

    for run in (cancelled, failed):
        stored = (await client.read_flow_run(run.id)).parameters
        assert stored == {**run.parameters, "access_token": SPENT}
    assert (await client.read_flow_run(waiting.id)).parameters == waiting.parameters
    assert (await client.read_flow_run(patched.id)).parameters == {
        **patched.parameters,
        "access_token": REDACTED,
    }
    assert (await client.read_flow_run(foreign_sealed.id)).parameters == {"access_token": sealed}
    assert (await client.read_flow_run(foreign_plain.id)).parameters == {"access_token": plain}

    # Placeholders are never rewritten: not by a later pass, nor by a restarted one.
    assert (await housekeep_once(config=config, state=state)).spent == ()
    again = await housekeep_once(config=config, state=HousekeepingState())
    assert again.full_pass
    assert (again.spent, again.redacted) == ((), ())


# --------------------------------------------------------------------------- schedules


async def test_the_housekeeper_computes_the_schedulers_own_keys(client: PrefectClient) -> None:
    """The nightly-rollup runs Prefect's scheduler made carry exactly the keys computed."""
    deployment = await client.read_deployment_by_name("nightly-rollup/nightly-rollup")
    declared = declared_deployment("nightly-rollup", PROJECT)
    assert declared is not None
    (schedule,) = declared.schedules
    api_schedule = next(s for s in deployment.schedules if s.slug == schedule.slug)
    now = datetime.now(UTC)
    keys = {
        scheduler_key(deployment.id, api_schedule.id, slot)
        for slot in schedule_slots(schedule, now, now + timedelta(days=10))
    }
    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
            idempotency_key=FlowRunFilterIdempotencyKey(any_=sorted(keys)),
        )
    )
    scheduled = [run for run in runs if run.auto_scheduled]
    assert scheduled, "the scheduler keeps nightly-rollup's coming nights scheduled"
    assert all(run.created_by.id == api_schedule.id for run in scheduled)


async def test_a_squatter_of_a_coming_nightly_rollup_night_is_deleted_and_named(
    tag: str, client: PrefectClient, cleanup: list[Callable[[], Any]]
) -> None:
    deployment = await client.read_deployment_by_name("nightly-rollup/nightly-rollup")
    declared = declared_deployment("nightly-rollup", PROJECT)
    assert declared is not None
    (schedule,) = declared.schedules
    api_schedule = next(s for s in deployment.schedules if s.slug == schedule.slug)
    config = HousekeepingConfig(
        project_dir=PROJECT, deployments=frozenset({"nightly-rollup"}), tags=(tag,), limits=()
    )
    # NOTE: the stack's own worker runs the same housekeeping every minute, on every run: when
    # its pass deletes the squatter between its creation and this test's pass, the test
    # squats another night (the worker's pass is what the product does; it just was first).
    for _ in range(3):
        # A night of its own, weeks ahead: past the scheduler's three coming runs, within
        # the 100 days it schedules at most.
        ahead = datetime.now(UTC) + timedelta(days=30 + uuid.uuid4().int % 60)
        (night,) = schedule_slots(schedule, ahead, ahead + timedelta(days=1))[:1]
        key = scheduler_key(deployment.id, api_schedule.id, night)
        squatter = await client.create_flow_run_from_deployment(
            deployment.id,
            parameters={},
            idempotency_key=key,
            state=Scheduled(scheduled_time=night),
            tags=[tag],
        )
        cleanup.append(_forget(client, squatter.id))
        assert tag in squatter.tags and not squatter.auto_scheduled, "a night nobody else took"
        genuine_before = await _scheduled_ids(client, deployment.id)

        state = HousekeepingState()
        report = await housekeep_once(config=config, state=state)
        if report.squatters_deleted or not await _gone(client, squatter.id):
            break

    assert report.squatters_deleted == (squatter.id,)
    with pytest.raises(ObjectNotFound):
        await client.read_flow_run(squatter.id)
    (finding,) = _only(report.findings, HOUSEKEEPING_EVENTS["slot_squatted"])
    assert finding.message.startswith(
        f"nightly-rollup {night:%Y-%m-%d} 02:15 UTC: its scheduler idempotency key was taken "
        f"by a run created through the API (flow run {squatter.id}"
    )
    assert "deleted, so Prefect's scheduler can create the real one" in finding.message
    assert finding.event_id in report.emitted
    (event,) = await _events(client, [finding.event_id])
    assert event.event == "tenantflow.schedule.slot-squatted"
    assert event.resource.id == f"prefect.deployment.{deployment.id}"
    assert event.payload["message"] == finding.message
    assert event.payload["flow_run_id"] == str(squatter.id)
    # The real nightly runs are untouched.
    genuine_after = await _scheduled_ids(client, deployment.id)
    assert genuine_before <= genuine_after


async def test_the_scheduler_creates_the_night_once_its_squatter_is_deleted(
    own_project: OwnProject, tag: str, client: PrefectClient, cleanup: list[Callable[[], Any]]
) -> None:
    project = own_project
    now = datetime.now(UTC)
    first, second, third = project.slots(now + timedelta(minutes=5), now + timedelta(days=4))[:3]
    squatter = await client.create_flow_run_from_deployment(
        project.deployment_id,
        idempotency_key=scheduler_key(project.deployment_id, project.schedule_id, first),
        state=Scheduled(scheduled_time=first),
        tags=[tag],
    )
    cleanup.append(_forget(client, squatter.id))
    await client.update_deployment_schedule(project.deployment_id, project.schedule_id, active=True)
    await _touch(client, project.deployment_id)
    # The scheduler made the next two nights, and nothing for the squatted one.
    await _scheduled_for(client, project, [second, third])
    holders = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            idempotency_key=FlowRunFilterIdempotencyKey(
                any_=[scheduler_key(project.deployment_id, project.schedule_id, first)]
            )
        )
    )
    assert [run.id for run in holders] == [squatter.id]

    report = await housekeep_once(config=project.config(tag), state=HousekeepingState())
    assert report.squatters_deleted == (squatter.id,)
    (finding,) = _only(report.findings, HOUSEKEEPING_EVENTS["slot_squatted"])
    assert finding.message.startswith(
        f"{project.name} {first:%Y-%m-%d %H:%M} UTC: its scheduler idempotency key was taken "
        f"by a run created through the API (flow run {squatter.id}"
    )

    await _touch(client, project.deployment_id)
    runs = await _scheduled_for(client, project, [first])
    assert runs[first].created_by.id == project.schedule_id
    assert runs[first].id != squatter.id


async def test_a_night_without_its_scheduled_run_is_named_once_and_alerted(
    own_project: OwnProject,
    tag: str,
    client: PrefectClient,
    cleanup: list[Callable[[], Any]],
) -> None:
    """The schedule is paused in Prefect (as an API holder can leave it): the nights pass
    with no run. The clock is moved three days ahead to judge them."""
    project = own_project
    receiver = Receiver()
    receiver.thread.start()
    cleanup.append(lambda: asyncio.to_thread(receiver.server.shutdown))
    block = CustomWebhookNotificationBlock(
        name="housekeeping test",
        url=receiver.url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "tenantflow-test"},
    )
    block_id = await block.asave(f"tenantflow-alerts-{tag}")
    cleanup.append(lambda: client.delete_block_document(block_id))
    automation = housekeeping_automation(block_id).model_copy(
        update={"name": f"tenantflow-housekeeping-alerts-{tag}"}
    )
    automation_id = await client.create_automation(automation)
    cleanup.append(lambda: client.delete_automation(automation_id))

    clock = datetime.now(UTC) + timedelta(days=3)
    nights = project.slots(clock - timedelta(days=2), clock - timedelta(minutes=30))
    assert nights, "two days hold at least one night"
    state = HousekeepingState()
    report = await housekeep_once(config=project.config(tag), state=state, now=clock)

    missed = _only(report.findings, HOUSEKEEPING_EVENTS["slot_missed"])
    assert [finding.message for finding in missed] == [
        f"no scheduled run for {project.name}'s {night:%Y-%m-%d %H:%M} UTC slot "
        f"(its schedule {project.slug} is paused in Prefect)"
        for night in nights
    ]
    assert set(report.emitted) == {finding.event_id for finding in missed}
    events = await _events(client, list(report.emitted))
    assert {event.payload["slot"] for event in events} == {night.isoformat() for night in nights}

    night = f"{nights[0]:%Y-%m-%d %H:%M} UTC"
    body = await asyncio.to_thread(receiver.wait_for, f"{project.name}'s {night} slot", 90)
    assert body["subject"] == f"tenantflow: no scheduled run for {project.name}'s {night} slot"
    assert f"no scheduled run for {project.name}'s {night} slot" in body["body"]

    # Once per night: not again from this housekeeper, nor from a restarted one (the
    # server already has the event).
    again = await housekeep_once(config=project.config(tag), state=state, now=clock)
    assert len(again.findings) == len(missed) and again.emitted == ()
    restarted = await housekeep_once(
        config=project.config(tag), state=HousekeepingState(), now=clock
    )
    assert len(restarted.findings) == len(missed) and restarted.emitted == ()
    assert len(receiver.matching(f"{project.name}'s {night} slot")) == 1


async def test_a_night_whose_run_was_cancelled_before_it_ran_is_named(
    own_project: OwnProject, tag: str, client: PrefectClient
) -> None:
    project = own_project
    now = datetime.now(UTC)
    (first,) = project.slots(now + timedelta(minutes=5), now + timedelta(days=2))[:1]
    await client.update_deployment_schedule(project.deployment_id, project.schedule_id, active=True)
    await _touch(client, project.deployment_id)
    scheduled = (await _scheduled_for(client, project, [first]))[first]
    await client.set_flow_run_state(scheduled.id, Cancelled())

    clock = first + timedelta(hours=1)
    report = await housekeep_once(config=project.config(tag), state=HousekeepingState(), now=clock)
    missed = _only(report.findings, HOUSEKEEPING_EVENTS["slot_missed"])
    assert [finding.message for finding in missed] == [
        f"{project.name}'s {first:%Y-%m-%d %H:%M} UTC slot did not run: its scheduled flow run "
        f"{scheduled.id} is Cancelled and never started"
    ]
    assert missed[0].related == (
        {
            "prefect.resource.id": f"prefect.flow-run.{scheduled.id}",
            "prefect.resource.role": "flow-run",
        },
    )
    # The scheduler's own run is not a squatter: nothing was deleted.
    assert report.squatters_deleted == ()
    assert (await client.read_flow_run(scheduled.id)).state_name == "Cancelled"


# --------------------------------------------------------------------------- limits


@pytest.fixture
async def own_limit(tag: str, client: PrefectClient, cleanup: list[Callable[[], Any]]) -> str:
    name = f"tenantflow-housekeeping-{tag}"
    await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=100))
    cleanup.append(lambda: client.delete_global_concurrency_limit_by_name(name))
    return name


async def test_a_limit_full_with_nobody_holding_it_is_reported_once(
    own_limit: str, tag: str, client: PrefectClient
) -> None:
    # Every slot taken through the API, as an API holder can; no lease holds them.
    await client.update_global_concurrency_limit(
        own_limit, GlobalConcurrencyLimitUpdate(active_slots=100)
    )
    waiting = HousekeepingConfig(
        project_dir=PROJECT, tags=(tag,), limits=(own_limit,), limit_stuck_after=timedelta(hours=1)
    )
    patient = await housekeep_once(config=waiting, state=HousekeepingState())
    assert _only(patient.findings, HOUSEKEEPING_EVENTS["limit_stuck"]) == []

    config = HousekeepingConfig(
        project_dir=PROJECT, tags=(tag,), limits=(own_limit,), limit_stuck_after=timedelta(0)
    )
    state = HousekeepingState()
    report = await housekeep_once(config=config, state=state)
    (finding,) = _only(report.findings, HOUSEKEEPING_EVENTS["limit_stuck"])
    assert finding.message.startswith(f"Concurrency limit {own_limit} has 100 of 100 slots taken")
    assert finding.event_id in report.emitted
    (event,) = await _events(client, [finding.event_id])
    assert event.event == "tenantflow.concurrency-limit.stuck"
    assert event.resource.name == own_limit
    assert event.payload["active_slots"] == 100
    assert event.payload["leased_slots_at_most"] < 100
    assert event.payload["unheld_slots"] == 100 - event.payload["leased_slots_at_most"]

    # Reported once; never reset by the housekeeper.
    again = await housekeep_once(config=config, state=state)
    assert len(_only(again.findings, HOUSEKEEPING_EVENTS["limit_stuck"])) == 1
    assert finding.event_id not in again.emitted
    assert (await client.read_global_concurrency_limit_by_name(own_limit)).active_slots == 100

    await client.update_global_concurrency_limit(
        own_limit, GlobalConcurrencyLimitUpdate(active_slots=0)
    )
    cleared = await housekeep_once(config=config, state=state)
    assert _only(cleared.findings, HOUSEKEEPING_EVENTS["limit_stuck"]) == []
    assert state.stuck_since == {}
