"""Warm starts through a real worker: each run its own process, nothing of one run in the next.

A worker on a pool of its own serves a probe flow that a temporary project declares; it
polls once an hour, so every run here starts because Prefect's events woke it. The
probe reports what its process holds (pid, argv, a leaked environment variable, a leaked
module global, the sockets it inherited), then leaves its own traces for the next run to
find. Also: a changed flow file is what the next run runs; a killed waiting process is
replaced; a SIGKILLed run ends Crashed and the worker goes on; a cancelled run's process
ends; the worker's stop leaves no waiting process behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelling

from tenantflow_dev import Stack
from tenantflow_dev.os_users import grant_traversal
from tenantflow_dev.processes import pid_alive
from tenantflow_dev.worker import LocalWorker

pytestmark = [pytest.mark.stack, pytest.mark.slow]

PROBE = '''"""What a flow-run process holds, for the warm-start tests."""
import json
import os
import socket
import sys
import time

from prefect import flow, get_run_logger

import tenantflow.flow_run as preloaded

VERSION = "{version}"


def _sockets():
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{{fd}}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.append(target)
    return found


@flow(name="tenantflow-warm-test", persist_result=False)
def probe(marker: str, seconds: float = 0.0) -> None:
    seen = {{
        "version": VERSION,
        "pid": os.getpid(),
        "warm": "--warm" in sys.argv,
        "env": os.environ.get("TENANTFLOW_TEST_LEAK"),
        "module": getattr(preloaded, "test_leak", None),
        "sockets": _sockets(),
    }}
    # Traces a later run must never find.
    os.environ["TENANTFLOW_TEST_LEAK"] = marker
    preloaded.test_leak = marker
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    preloaded.test_socket = held
    seen["left"] = f"socket:[{{os.fstat(held.fileno()).st_ino}}]"
    get_run_logger().info("SEEN %s", json.dumps(seen))
    time.sleep(seconds)
'''
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


@dataclasses.dataclass
class Served:
    pool: str
    deployment_id: UUID
    flow_file: Path
    worker: LocalWorker


@pytest.fixture
async def served(stack: Stack, tmp_path: Path) -> AsyncIterator[Served]:
    """A pool of its own, a deployment of the probe on it, and a worker serving it (which
    starts a process for its next run at once)."""
    flows = tmp_path / "project" / "flows"
    flows.mkdir(parents=True)
    flow_file = flows / "probe.py"
    flow_file.write_text(PROBE.format(version="one"))
    grant_traversal(flows)
    pool = f"tenantflow-warm-test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "project" / "prefect.yaml").write_text(
        f"deployments:\n  - name: {pool}\n    entrypoint: flows/probe.py:probe\n"
        f"    work_pool:\n      name: {pool}\n"
    )
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = await client.create_flow_from_name("tenantflow-warm-test")
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=pool,
            entrypoint="flows/probe.py:probe",
            work_pool_name=pool,
            parameter_openapi_schema={
                "type": "object",
                "properties": {"marker": {"type": "string"}, "seconds": {"type": "number"}},
            },
        )
    config = dataclasses.replace(stack.config, project_dir=tmp_path / "project")
    # NOTE: a poll once an hour: runs created after the worker's start begin only because
    # Prefect's events wake the worker (tenantflow.wake).
    worker = LocalWorker(
        config,
        pool=pool,
        worker_name=f"{pool}-worker",
        root=tmp_path / "worker",
        settings={"PREFECT_WORKER_QUERY_SECONDS": "3600"},
    )
    try:
        assert await asyncio.to_thread(worker.start)
        yield Served(pool, deployment_id, flow_file, worker)
    finally:
        await asyncio.to_thread(worker.stop)
        async with get_client() as client:
            await client.delete_deployment(deployment_id)
            await client.delete_work_pool(pool)


def waiting_processes(worker_pid: int) -> list[int]:
    """The worker's children started ahead of a run (`tenantflow.flow_run --warm`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == worker_pid and b"--warm" in argv and b"tenantflow.flow_run" in argv:
            found.append(int(entry.name))
    return found


async def waiting_process(worker: LocalWorker, not_: set[int] | None = None) -> int:
    """The one process waiting for the worker's next run (other than `not_`)."""
    pid = worker.pid()
    assert pid is not None
    async with asyncio.timeout(60):
        while True:
            waiting = [p for p in waiting_processes(pid) if p not in (not_ or set())]
            if len(waiting) == 1:
                return waiting[0]
            await asyncio.sleep(0.2)


def environment_shown(pid: int) -> list[bytes]:
    """What `/proc/PID/environ` shows of a process (what ps and other tools read)."""
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


async def gone(pid: int) -> None:
    """Until `pid` has exited (at most 30 s)."""
    for _ in range(150):
        if not pid_alive(pid):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"process {pid} is still alive after 30 s")


async def wait_for(client: PrefectClient, run_id: UUID, states: set[StateType]) -> Any:
    async with asyncio.timeout(120):
        while True:
            run = await client.read_flow_run(run_id)
            if run.state_type in states:
                return run
            await asyncio.sleep(0.2)


async def seen_by(client: PrefectClient, run_id: UUID) -> dict[str, Any]:
    """What the probe reported of its process (its log line reaches the API on its own)."""
    async with asyncio.timeout(30):
        while True:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            )
            for log in logs:
                if log.message.startswith("SEEN "):
                    seen: dict[str, Any] = json.loads(log.message.removeprefix("SEEN "))
                    return seen
            await asyncio.sleep(0.3)


async def run_probe(
    client: PrefectClient, served: Served, marker: str
) -> tuple[Any, dict[str, Any]]:
    run = await client.create_flow_run_from_deployment(
        served.deployment_id, parameters={"marker": marker}
    )
    done = await wait_for(client, run.id, TERMINAL)
    assert done.state_type == StateType.COMPLETED, done.state
    return done, await seen_by(client, run.id)


async def test_each_run_gets_a_fresh_process_started_ahead(served: Served) -> None:
    async with get_client() as client:
        first_waiting = await waiting_process(served.worker)
        _, first = await run_probe(client, served, "first")
        assert first["pid"] == first_waiting and first["warm"], first
        # Run one's process is gone; another one is already waiting for the next run.
        await gone(first_waiting)
        second_waiting = await waiting_process(served.worker, not_={first_waiting})

        # The flow file changes on disk (a deploy) while that process waits.
        served.flow_file.write_text(PROBE.format(version="two"))
        _, second = await run_probe(client, served, "second")
        assert second["pid"] == second_waiting and second["warm"], second
        assert second["version"] == "two"
        # Nothing the first run left in its process reaches the second.
        assert second["env"] is None and second["module"] is None, second
        assert first["left"] not in second["sockets"]

        third_waiting = await waiting_process(served.worker, not_={first_waiting, second_waiting})
        _, third = await run_probe(client, served, "third")
        assert third["pid"] == third_waiting and third["warm"], third
        assert third["env"] is None and third["module"] is None, third
        assert second["left"] not in third["sockets"]

        # A waiting process that dies (killed here) is replaced before the next run.
        waiting = await waiting_process(served.worker)
        os.kill(waiting, signal.SIGKILL)
        replacement = await waiting_process(served.worker, not_={waiting})
        _, seen = await run_probe(client, served, "after-kill")
        assert seen["pid"] == replacement and seen["warm"]


async def test_killed_and_cancelled_runs_end_alone_and_stop_clears_up(served: Served) -> None:
    async with get_client() as client:
        doomed = await client.create_flow_run_from_deployment(
            served.deployment_id, parameters={"marker": "doomed", "seconds": 300}
        )
        await wait_for(client, doomed.id, {StateType.RUNNING})
        pid = (await seen_by(client, doomed.id))["pid"]
        # Its process shows its run's variables, as a cold one would (ps, /proc).
        shown = environment_shown(pid)
        assert f"PREFECT__FLOW_RUN_ID={doomed.id}".encode() in shown
        assert not any(item.startswith(b"PREFECT__RESERVED") for item in shown)
        os.kill(pid, signal.SIGKILL)
        crashed = await wait_for(client, doomed.id, TERMINAL)
        assert crashed.state_type == StateType.CRASHED, crashed.state
        health = await asyncio.to_thread(served.worker.health)
        assert health.healthy, health

        cancelled = await client.create_flow_run_from_deployment(
            served.deployment_id, parameters={"marker": "cancelled", "seconds": 300}
        )
        await wait_for(client, cancelled.id, {StateType.RUNNING})
        pid = (await seen_by(client, cancelled.id))["pid"]
        await client.set_flow_run_state(cancelled.id, Cancelling())
        ended = await wait_for(client, cancelled.id, TERMINAL)
        assert ended.state_type == StateType.CANCELLED, ended.state
        await gone(pid)

        # The next run is as good as ever, in the process started for it meanwhile.
        waiting = await waiting_process(served.worker)
        _, seen = await run_probe(client, served, "after")
        assert seen["pid"] == waiting and seen["warm"] and seen["env"] is None

    # The worker's stop takes its waiting process with it.
    waiting = await waiting_process(served.worker)
    assert await asyncio.to_thread(served.worker.stop)
    await gone(waiting)
