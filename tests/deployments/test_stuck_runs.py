"""A flow run taken by a worker that died before starting it is marked Crashed.

A worker takes a run (`Pending`), prepares it (`Submitting`), then starts its process or
container, whose engine sets it `Running`. Killed in between, the worker leaves a run
nobody will start and that sends no heartbeat for the zombie automation to miss. The run
here goes through the same states, set through the API as the worker sets them, on a
pool no worker serves: nothing else can move it.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State, StateType
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.states import Pending, Running, Submitting

from tenantflow.automations import AUTOMATIONS, Alerts, stuck_start_automation
from tenantflow_dev import Stack
from tests.deployments.test_alerts import (  # noqa: F401 (fixtures)
    TERMINAL,
    _bootstrap,
    _wait_for,
    restore_automations,
    sleepy,
)

#: The window of the test's automation; Prefect evaluates proactive triggers every 5 s.
STUCK_AFTER_S = 12


def test_the_automation_expects_running_after_a_worker_takes_a_run() -> None:
    automation = stuck_start_automation(Alerts(stuck_start_after_s=600))
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger)
    assert trigger.posture == Posture.Proactive
    assert trigger.after == {"prefect.flow-run.Pending", "prefect.flow-run.Submitting"}
    assert {"prefect.flow-run.Running", "prefect.flow-run.Completed"} <= trigger.expect
    assert "prefect.flow-run.Submitting" not in trigger.expect
    assert trigger.within == timedelta(seconds=600)
    (action,) = automation.actions
    assert action.type == "change-flow-run-state"
    assert action.state == StateType.CRASHED


@pytest.mark.stack
@pytest.mark.slow
async def test_a_run_taken_but_never_started_is_crashed_and_a_started_one_is_not(
    stack: Stack,
    sleepy: tuple[str, UUID],  # noqa: F811
    restore_automations: None,  # noqa: F811
) -> None:
    _, deployment_id = sleepy
    # NOTE: a zombie window far beyond the test, so only the new automation can act.
    result = await _bootstrap(stack, Alerts(zombie_after_s=3600, stuck_start_after_s=STUCK_AFTER_S))
    assert result.automations[AUTOMATIONS["stuck"]] in {"created", "updated"}
    async with get_client() as client:
        # NOTE: one after the other: the deployment runs one at a time (as nightly-rollup).
        stuck = await client.create_flow_run_from_deployment(deployment_id)
        await client.set_flow_run_state(stuck.id, Pending())
        await client.set_flow_run_state(stuck.id, Submitting())
        crashed = await _wait_for(client, stuck.id, TERMINAL, STUCK_AFTER_S + 60)
        assert crashed.state_type == StateType.CRASHED, crashed.state
        assert f"Taken by a worker but not started within {STUCK_AFTER_S}s" in (
            crashed.state.message or ""
        )

        started = await client.create_flow_run_from_deployment(deployment_id)
        states: list[State[Any]] = [Pending(), Submitting(), Running()]
        for state in states:
            accepted = await client.set_flow_run_state(started.id, state)
            assert accepted.state is not None and accepted.state.name == state.name
        # Past the window, and Prefect's 5 s evaluation: Running satisfied the automation.
        await asyncio.sleep(STUCK_AFTER_S + 10)
        still = await client.read_flow_run(started.id)
        assert still.state_type == StateType.RUNNING, still.state
        for run in (stuck, started):
            await client.delete_flow_run(run.id)
