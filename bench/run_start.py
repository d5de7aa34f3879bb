"""How fast a run starts: the tenantflow worker against Prefect's stock process worker.

Both serve the stack's `tenantflow-process` pool in turn, with production settings (Prefect's
default poll, every 10 s), on the same stack in the same run: `noop` and `client-report`,
created -> Running and created -> Completed, median of `RUNS` each, a pause of a few seconds
(random) between runs so a run's creation falls anywhere in the poll's cycle.

Memory: the PSS (proportional set size, shared pages split between their users) of one worker
and 10 runs of a sleeping flow at once, warm starts on and off, on a pool of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import random
import statistics
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType

from bench.stackapi import TimedRun, on_stack, run_deployment_timed
from bench.table import Row, machine, ratio, render, say, update
from tenantflow_dev import Stack
from tenantflow_dev.config import StackConfig
from tenantflow_dev.demo import ACME, DEMO_MEMBER, sealed_token
from tenantflow_dev.os_users import grant_traversal
from tenantflow_dev.worker import LocalWorker

RUNS = int(os.environ.get("BENCH_START_RUNS", "5"))
CONCURRENT = 10


class StockWorker(LocalWorker):
    """Prefect's own process worker (`prefect worker start --type process`), the baseline.

    It runs as the benchmark's own OS user: its flow runs start in the project folder
    (the deployments' pull step), whose `.env` the stack's worker user may not read.
    """

    def __init__(self, config: StackConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.os_user = pwd.getpwuid(os.getuid()).pw_name

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            self.pool,
            "--type",
            "process",
            "--name",
            self.worker_name,
            *(["--limit", str(self.limit)] if self.limit else []),
        ]


async def _report(config: StackConfig) -> TimedRun:
    today = datetime.now(UTC).date()
    period = {
        "period_start": (today - timedelta(days=7)).isoformat(),
        "period_end": today.isoformat(),
    }
    token = await sealed_token(
        config, DEMO_MEMBER, flow="client-report", client_ids=[ACME.id], parameters=period
    )
    return await run_deployment_timed(
        "client-report/client-report",
        {"client_id": str(ACME.id), **period, "access_token": token},
        poll=0.05,
    )


async def _noop(_: StackConfig) -> TimedRun:
    return await run_deployment_timed("noop/noop", {}, poll=0.05)


async def _series(config: StackConfig) -> dict[str, list[TimedRun]]:
    runs: dict[str, list[TimedRun]] = {"noop": [], "client-report": []}
    makers: dict[str, Callable[[StackConfig], Awaitable[TimedRun]]] = {
        "noop": _noop,
        "client-report": _report,
    }
    for _ in range(RUNS):
        for name, make in makers.items():
            await asyncio.sleep(random.uniform(2.0, 4.0))
            run = await make(config)
            if not run.ok:
                raise RuntimeError(f"{name} run {run.id} ended {run.state}: {run.message}")
            runs[name].append(run)
    return runs


def _median(runs: list[TimedRun], what: str) -> float:
    return float(statistics.median(getattr(run, what) for run in runs))


async def _with_stock_worker(stack: Stack) -> dict[str, list[TimedRun]]:
    """The series on Prefect's stock worker, the stack's own worker stopped meanwhile."""
    own = LocalWorker(stack.config)
    await asyncio.to_thread(own.stop)
    stock = StockWorker(
        stack.config,
        worker_name=f"bench-stock-{uuid.uuid4().hex[:6]}",
        root=Path(tempfile.mkdtemp(prefix="tenantflow-bench-stock-")),
    )
    try:
        await asyncio.to_thread(stock.start)
        return await _series(stack.config)
    finally:
        await asyncio.to_thread(stock.stop)
        await asyncio.to_thread(own.start)


async def start_rows(stack: Stack) -> list[Row]:
    say(
        f"\n## run start, production poll (10 s): tenantflow worker vs Prefect's stock "
        f"process worker ({RUNS} runs each)"
    )
    ours = await _series(stack.config)
    stock = await _with_stock_worker(stack)
    rows = []
    for flow_name in ("noop", "client-report"):
        for what, label, limit in (
            ("created_to_started", "created->Running", 0.5),
            ("created_to_completed", "created->Completed", 1.2 if flow_name != "noop" else None),
        ):
            value, base = _median(ours[flow_name], what), _median(stock[flow_name], what)
            say(f"  {flow_name:<14} {label:<20} {value:6.2f}s   stock {base:6.2f}s")
            rows.append(
                Row(
                    f"{flow_name}, {label}, production poll (s, median)",
                    f"{value:.2f}",
                    f"{base:.2f} (Prefect's stock process worker)",
                    ratio(value, base),
                    "-" if limit is None else f"<= {limit:g} s",
                    None if limit is None else value <= limit,
                )
            )
    rows += await memory_rows(stack)
    return rows


SLEEPY = '''"""Sleeps: ten of these at once measure a worker's memory."""
import time

from prefect import flow


@flow(name="tenantflow-bench-sleepy", persist_result=False)
def sleepy(seconds: float = 30.0) -> None:
    time.sleep(seconds)
'''


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


async def _pss_of_ten(stack: Stack, warm: bool) -> int:
    """PSS (kB) of a worker and its processes while 10 sleeping runs are Running."""
    folder = Path(tempfile.mkdtemp(prefix="tenantflow-bench-pss-"))
    (folder / "flows").mkdir()
    (folder / "flows" / "sleepy.py").write_text(SLEEPY)
    grant_traversal(folder / "flows")
    pool = f"tenantflow-bench-pss-{uuid.uuid4().hex[:6]}"
    (folder / "prefect.yaml").write_text(
        f"deployments:\n  - name: {pool}\n    entrypoint: flows/sleepy.py:sleepy\n"
        f"    work_pool:\n      name: {pool}\n"
    )
    previous = os.environ.get("WORKER_WARM_START")
    os.environ["WORKER_WARM_START"] = "true" if warm else "false"
    config = dataclasses.replace(stack.config, project_dir=folder)
    worker = LocalWorker(
        config, pool=pool, worker_name=f"{pool}-worker", root=folder / "worker", limit=CONCURRENT
    )
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = await client.create_flow_from_name("tenantflow-bench-sleepy")
        deployment_id = await client.create_deployment(
            flow_id=flow_id, name=pool, entrypoint="flows/sleepy.py:sleepy", work_pool_name=pool
        )
        try:
            await asyncio.to_thread(worker.start)
            runs = [
                await client.create_flow_run_from_deployment(
                    deployment_id, parameters={"seconds": 60}
                )
                for _ in range(CONCURRENT)
            ]
            async with asyncio.timeout(180):
                while True:
                    states = [(await client.read_flow_run(run.id)).state_type for run in runs]
                    if all(state == StateType.RUNNING for state in states):
                        break
                    await asyncio.sleep(0.5)
            await asyncio.sleep(3)  # the runs past their start
            pid = worker.pid()
            assert pid is not None
            return sum(_pss_kb(p) for p in _tree(pid))
        finally:
            await asyncio.to_thread(worker.stop)
            await client.delete_deployment(deployment_id)
            await client.delete_work_pool(pool)
            if previous is None:
                os.environ.pop("WORKER_WARM_START", None)
            else:
                os.environ["WORKER_WARM_START"] = previous


async def memory_rows(stack: Stack) -> list[Row]:
    cold = await _pss_of_ten(stack, warm=False)
    warm = await _pss_of_ten(stack, warm=True)
    say(
        f"  PSS of a worker and {CONCURRENT} running flow runs: warm starts {warm / 1024:.0f} MiB, "
        f"cold {cold / 1024:.0f} MiB"
    )
    return [
        Row(
            f"PSS of one worker and {CONCURRENT} running flow runs (MiB)",
            f"{warm / 1024:.0f} (warm starts)",
            f"{cold / 1024:.0f} (every process started cold)",
            ratio(warm, cold),
        )
    ]


def main() -> None:
    """`python -m bench.run_start`: these measures alone, into `bench/results.md`."""
    rows = on_stack(start_rows)
    say("\n" + render(rows))
    update(rows, f"the run-start and memory rows measured alone ({machine()})")


if __name__ == "__main__":
    main()
