"""A flow-run process starts Prefect's suspension observer for its run before the engine
asks for it (`tenantflow.flow_run.observe_suspension_early`): the engine adopts it, and a
suspension that came before the engine had its request still reaches that request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from prefect import flow
from prefect._flow_run_suspension import FlowRunSuspensionRequest
from prefect._internal.observers import FlowRunSuspendingObserver
from prefect.client.orchestration import get_client
from prefect.states import Running, Suspended

from tenantflow.flow_run import _EarlySuspensionObserver
from tenantflow_dev import Stack

pytestmark = [pytest.mark.stack]


@flow(name="tenantflow-early-observer-probe", persist_result=False)
def _probe() -> None:
    """Only the flow a probe run belongs to; never run."""


def _wait_for(condition: Callable[[], object], within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def engine_observe() -> Any:
    """What the engine calls to observe its run's suspension (`observe_flow_run_suspension`)."""
    from prefect import flow_engine

    return flow_engine.__dict__["observe_flow_run_suspension"]


async def test_a_suspension_before_the_engine_asks_reaches_the_runs_request(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow_engine

    async with get_client() as client:
        run = await client.create_flow_run(_probe, state=Running())
        other = await client.create_flow_run(_probe, state=Running())
        try:
            # NOTE: install() replaces the engine's function; put Prefect's back afterwards.
            monkeypatch.setattr(flow_engine, "observe_flow_run_suspension", engine_observe())
            early = await asyncio.to_thread(_EarlySuspensionObserver, run.id)
            early.install()
            # The observer connects in its own thread; the run is suspended before the
            # engine registered any request for it.
            await asyncio.to_thread(early._entered.join, 20)
            await client.set_flow_run_state(run.id, Suspended(timeout_seconds=600), force=True)
            assert await asyncio.to_thread(_wait_for, lambda: early._requested)

            # From here on, count the observers Prefect makes: the engine's call for this
            # run makes none (it adopts the one already connected).
            made: list[object] = []
            init = FlowRunSuspendingObserver.__init__

            def counted(self: FlowRunSuspendingObserver, *args: Any, **kwargs: Any) -> None:
                made.append(self)
                init(self, *args, **kwargs)

            monkeypatch.setattr(FlowRunSuspendingObserver, "__init__", counted)
            request = FlowRunSuspensionRequest()
            with engine_observe()(run.id, request):
                assert made == []
                state = request.get_state()
                assert state is not None and state.name == "Suspended"

            # Another run (or the same one asked again) gets Prefect's own observer.
            again = FlowRunSuspensionRequest()
            with engine_observe()(other.id, again):
                assert len(made) == 1
                assert not again.is_requested()
        finally:
            for probe in (run, other):
                await client.delete_flow_run(probe.id)
