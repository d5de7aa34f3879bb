"""Runs through a deployment and the worker, timed from what the Prefect API records."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from prefect.client.orchestration import get_client
from prefect.deployments.flow_runs import arun_deployment
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from tenantflow.project import deployment_names
from tenantflow.settings import get_settings
from tenantflow_dev import Stack
from tenantflow_dev.config import StackConfig
from tenantflow_dev.prefect_setup import deploy

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
T = TypeVar("T")


def on_stack(work: Callable[[Stack], Coroutine[Any, Any, T]]) -> T:
    """Run `work` against the local stack the TENANTFLOW_* environment names (brought up
    if it is not), with this process's settings and Prefect's client pointed at it."""
    stack = Stack()
    if not all(part.healthy for part in stack.status()):
        stack.up(setup=True)
    os.environ.update(stack.config.environment())
    get_settings.cache_clear()
    if "noop" not in deployment_names(stack.config.project_dir):
        raise SystemExit("prefect.yaml declares no noop deployment")
    # NOTE: deploy again, so the server knows every deployment prefect.yaml declares
    # (a stack brought up before a deployment was added lacks it); idempotent.
    deploy(stack.config)
    with temporary_settings(
        {
            PREFECT_API_URL: stack.config.prefect_api_url,
            PREFECT_API_AUTH_STRING: stack.config.secrets.prefect_auth_string,
        }
    ):
        return asyncio.run(work(stack))


@dataclass(frozen=True)
class TimedRun:
    """One flow run, its final state and its times as the API recorded them."""

    id: uuid.UUID
    state: str
    message: str | None
    created: datetime
    started: datetime | None
    ended: datetime | None
    completed: datetime | None

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"

    @property
    def run_seconds(self) -> float:
        """Start to end of the flow run (its Running state to its final state)."""
        if self.started is None or self.ended is None:
            return float("nan")
        return (self.ended - self.started).total_seconds()

    @property
    def created_to_completed(self) -> float:
        """What an operator waits: the run's creation to its Completed state."""
        if self.completed is None:
            return float("nan")
        return (self.completed - self.created).total_seconds()

    @property
    def created_to_started(self) -> float:
        if self.started is None:
            return float("nan")
        return (self.started - self.created).total_seconds()


async def run_deployment_timed(
    name: str, parameters: dict[str, Any], *, within: float = 900, poll: float = 0.5
) -> TimedRun:
    """Create a run of deployment `name`, wait for a final state, read its times."""
    created = await arun_deployment(name, parameters=parameters, timeout=0)
    deadline = asyncio.get_running_loop().time() + within
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(created.id)
            if run.state is not None and run.state.type.value in FINAL:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"flow run {created.id} not final after {within:g}s")
            await asyncio.sleep(poll)
        states = await client.read_flow_run_states(created.id)
    completed = next((s.timestamp for s in states if s.type.value == "COMPLETED"), None)
    assert run.created is not None
    assert run.state is not None
    return TimedRun(
        id=run.id,
        state=run.state.type.value,
        message=run.state.message,
        created=run.created,
        started=run.start_time,
        ended=run.end_time,
        completed=completed,
    )


async def task_run_count(
    flow_run_id: uuid.UUID, *, at_least: int = 1, settle_s: float = 3, within: float = 60
) -> int:
    """How many task runs a flow run and its child runs created (the API's count).

    The server records task runs from their events, a little after the flow run ends, so
    the count is read until it reaches `at_least` and stops changing for `settle_s` (or
    `within` seconds have passed).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last, since = -1, loop.time()
    async with get_client() as client:
        # NOTE: a sharded sweep's task runs are in its shard runs (child flow runs).
        children = await client._client.post(
            "/flow_runs/filter",
            json={"flow_runs": {"parent_flow_run_id": {"any_": [str(flow_run_id)]}}},
        )
        children.raise_for_status()
        runs = [str(flow_run_id), *(str(child["id"]) for child in children.json())]
        while True:
            response = await client._client.post(
                "/task_runs/count", json={"flow_runs": {"id": {"any_": runs}}}
            )
            response.raise_for_status()
            count = int(response.json())
            if count != last:
                last, since = count, loop.time()
            elif count >= at_least and loop.time() - since >= settle_s:
                return count
            if loop.time() > deadline:
                return count
            await asyncio.sleep(0.5)


def _sqlite_bytes(home: Path) -> int | None:
    files = [
        p
        for p in home.glob("*.db*")
        if p.is_file() and (p.suffix == ".db" or p.name.endswith(".db-wal"))
    ]
    return sum(p.stat().st_size for p in files) if files else None


async def prefect_database_bytes(config: StackConfig) -> int:
    """The Prefect server's database size: its PostgreSQL database if it has one (named
    `prefect` in the stack's cluster), else its SQLite files (`*.db`, `*.db-wal`)."""
    sqlite = _sqlite_bytes(config.prefect_home)
    if sqlite is not None:
        return sqlite
    conn = await asyncpg.connect(**config.connect_parts(config.pg_port, admin=True))
    try:
        size = await conn.fetchval(
            "SELECT pg_database_size(datname) FROM pg_database WHERE datname = 'prefect'"
        )
    finally:
        await conn.close()
    return int(size or 0)
