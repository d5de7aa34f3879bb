"""The Prefect API under concurrent load: 8 flow runs driven at once, each with 10 task
runs, every run created and taken through its states over raw HTTP (Prefect's client
retries 503s, which would hide them): 265 requests, most of them in flight together.

The devstack test asserts that none of them gets a server error
(`tests/devstack/test_prefect_database.py`); `make bench` times them on one server and on
two API replicas (`bench/api_latency.py`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tenantflow_dev.config import StackConfig

__all__ = ["FLOW_RUNS", "REQUESTS", "TASK_RUNS_PER_FLOW_RUN", "Api", "Load", "drive"]

FLOW_RUNS = 8
TASK_RUNS_PER_FLOW_RUN = 10
#: The flow, then per flow run: create, Running, Completed, and 3 per task run.
REQUESTS = 1 + FLOW_RUNS * (3 + 3 * TASK_RUNS_PER_FLOW_RUN)


class Api:
    """The stack's Prefect API over raw HTTP; every answer's status and time is kept."""

    def __init__(self, config: StackConfig) -> None:
        self.client = httpx.AsyncClient(
            base_url=config.prefect_api_url,
            headers=config.prefect_api_headers(),
            timeout=60,
        )
        self.statuses: list[int] = []
        #: Seconds each request took, in the order they ended.
        self.seconds: list[float] = []

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        started = time.perf_counter()
        response = await self.client.post(path, json=body)
        self.seconds.append(time.perf_counter() - started)
        self.statuses.append(response.status_code)
        assert response.status_code < 500, f"{path}: {response.status_code} {response.text}"
        response.raise_for_status()
        return response.json() if response.content else None

    async def flow_id(self, name: str) -> str:
        flow = await self.post("/flows/", {"name": name})
        return str(flow["id"])

    async def set_state(self, kind: str, run_id: str, state: str) -> None:
        await self.post(f"/{kind}/{run_id}/set_state", {"state": {"type": state}, "force": True})


@dataclass
class Load:
    """What one round of the load did: its runs, every answer, and its wall time."""

    run_ids: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    wall: float = 0.0


async def drive(config: StackConfig, *, flow: str = "tenantflow-pg-concurrency") -> Load:
    """The 265 requests against the stack's Prefect API, all flow runs at once."""
    api = Api(config)
    began = time.perf_counter()
    try:
        flow_id = await api.flow_id(flow)

        async def task_run(flow_run_id: str, index: int) -> None:
            created = await api.post(
                "/task_runs/",
                {
                    "flow_run_id": flow_run_id,
                    "task_key": "probe-task",
                    "dynamic_key": str(index),
                    "name": f"probe-task-{index}",
                    "state": {"type": "PENDING"},
                },
            )
            await api.set_state("task_runs", created["id"], "RUNNING")
            await api.set_state("task_runs", created["id"], "COMPLETED")

        async def flow_run(index: int) -> str:
            created = await api.post(
                "/flow_runs/",
                {"flow_id": flow_id, "name": f"concurrent-{index}", "state": {"type": "PENDING"}},
            )
            run_id = str(created["id"])
            await api.set_state("flow_runs", run_id, "RUNNING")
            await asyncio.gather(*(task_run(run_id, i) for i in range(TASK_RUNS_PER_FLOW_RUN)))
            await api.set_state("flow_runs", run_id, "COMPLETED")
            return run_id

        run_ids = await asyncio.gather(*(flow_run(i) for i in range(FLOW_RUNS)))
    finally:
        await api.client.aclose()
    return Load(list(run_ids), api.statuses, api.seconds, time.perf_counter() - began)
