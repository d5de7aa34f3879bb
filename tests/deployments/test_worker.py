"""The local stack's process worker as a service: start, run, stop without stuck runs.

A second worker on a pool of its own (so the stack's worker and other tests' runs are never
touched), serving a throwaway flow that a temporary project folder's prefect.yaml declares.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.states import Running

from tenantflow_dev import Stack
from tenantflow_dev.os_users import grant_traversal
from tenantflow_dev.processes import pid_alive
from tenantflow_dev.worker import LocalWorker
from tests.processes import processes_using

pytestmark = [pytest.mark.stack, pytest.mark.slow]

FLOW = '''"""A flow that sleeps, for the worker tests."""
import time

from prefect import flow


@flow(name="tenantflow-worker-test", persist_result=False)
def sleepy(seconds: float = 0.0) -> float:
    time.sleep(seconds)
    return seconds
'''
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    assert not pid_alive(process.pid)
    return process.pid


@pytest.fixture
async def deployment(stack: Stack, tmp_path: Path) -> AsyncIterator[tuple[str, UUID]]:
    """A pool of its own and a deployment of the sleepy flow on it."""
    (tmp_path / "project" / "flows").mkdir(parents=True)
    (tmp_path / "project" / "flows" / "sleepy.py").write_text(FLOW)
    # The worker's OS user reads the flows in the project folder (pytest's are private).
    grant_traversal(tmp_path / "project" / "flows")
    pool = f"tenantflow-worker-test-{uuid.uuid4().hex[:8]}"
    # NOTE: the worker runs only the deployments its project's prefect.yaml declares for
    # its own pool.
    (tmp_path / "project" / "prefect.yaml").write_text(
        f"deployments:\n  - name: {pool}\n    entrypoint: flows/sleepy.py:sleepy\n"
        f"    work_pool:\n      name: {pool}\n"
    )
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = await client.create_flow_from_name("tenantflow-worker-test")
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=pool,
            entrypoint="flows/sleepy.py:sleepy",
            work_pool_name=pool,
            pull_steps=[{"tenantflow.deployments.set_project_directory": {}}],
            parameter_openapi_schema={
                "type": "object",
                "properties": {"seconds": {"type": "number", "default": 0.0}},
            },
        )
    try:
        yield pool, deployment_id
    finally:
        async with get_client() as client:
            await client.delete_deployment(deployment_id)
            await client.delete_work_pool(pool)


async def _wait_for(client: PrefectClient, run_id: UUID, states: set[StateType]) -> Any:
    """The flow run once it is in one of `states` (at most two minutes)."""
    async with asyncio.timeout(120):
        while True:
            run = await client.read_flow_run(run_id)
            if run.state_type in states:
                return run
            await asyncio.sleep(0.3)


async def test_worker_runs_flows_and_stops_without_stuck_runs(
    stack: Stack, tmp_path: Path, deployment: tuple[str, UUID]
) -> None:
    pool, deployment_id = deployment
    config = dataclasses.replace(stack.config, project_dir=tmp_path / "project")
    worker = LocalWorker(
        config,
        pool=pool,
        worker_name=f"{pool}-worker",
        root=tmp_path / "worker",
        drain_seconds=2,
    )
    # A run left Running by a worker that died (its process is gone) is settled on start.
    async with get_client() as client:
        orphan = await client.create_flow_run_from_deployment(deployment_id)
        await client.update_flow_run(orphan.id, infrastructure_pid=str(dead_pid()))
        await client.set_flow_run_state(orphan.id, Running(), force=True)
    try:
        started = time.monotonic()
        assert await asyncio.to_thread(worker.start)
        async with get_client() as client:
            settled = await client.read_flow_run(orphan.id)
            assert settled.state_type == StateType.CRASHED, settled.state
        start_seconds = time.monotonic() - started
        health = await asyncio.to_thread(worker.health)
        assert health.healthy, health
        assert health.detail.startswith("online")
        assert not await asyncio.to_thread(worker.start), "a second start is a no-op"

        async with get_client() as client:
            # A run reaches Completed, its flow loaded from the project folder.
            created = time.monotonic()
            quick = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"seconds": 0}
            )
            done = await _wait_for(client, quick.id, TERMINAL)
            assert done.state_type == StateType.COMPLETED, done.state
            run_seconds = time.monotonic() - created

            # A run in progress when the worker stops ends Crashed, not stuck in Running.
            slow = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"seconds": 300}
            )
            await _wait_for(client, slow.id, {StateType.RUNNING})
            stopping = time.monotonic()
            assert await asyncio.to_thread(worker.stop)
            stop_seconds = time.monotonic() - stopping
            crashed = await client.read_flow_run(slow.id)
            assert crashed.state_type == StateType.CRASHED, crashed.state
            assert crashed.state is not None
            # NOTE: the stopping worker sends it SIGTERM, and its engine reports the end.
            assert "aborted by a termination signal" in (crashed.state.message or "")

        assert processes_using(tmp_path) == []
        assert worker.pid() is None
        assert not worker.pidfile.exists()
        assert not await asyncio.to_thread(worker.stop), "a second stop is a no-op"
        after = await asyncio.to_thread(worker.health)
        assert (after.running, after.healthy, after.detail) == (False, False, "not running")
        sys.stderr.write(
            f"\nworker start {start_seconds:.1f}s; run to Completed {run_seconds:.1f}s; "
            f"stop with a run in progress {stop_seconds:.1f}s\n"
        )
    finally:
        pid = worker.pid()
        await asyncio.to_thread(worker.stop)
        assert pid is None or not pid_alive(pid)
