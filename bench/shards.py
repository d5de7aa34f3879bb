"""A sweep in shards with two workers on the pool: which worker ran which shard, the peak
server connections against the budget, and the time against one unsharded flow run."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, date, datetime, timedelta

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

from bench.sweep import create_clients, remove_clients, sample_connections
from bench.table import Row, ratio, say
from tenantflow.settings import get_settings
from tenantflow_dev import Stack
from tenantflow_dev.demo import DEMO_OPERATOR, sealed_token
from tenantflow_dev.worker import LocalWorker

SHARD_CLIENTS = int(os.environ.get("BENCH_SHARD_CLIENTS", "4000"))
SHARD_SIZE = int(os.environ.get("BENCH_SHARD_SIZE", "1000"))


async def _sweep(stack: Stack, day: date, shard_size: int) -> tuple[float, object, list]:
    """`nightly-rollup` run here (the parent), its shards through the pool's workers."""
    from flows.nightly_rollup import nightly_rollup

    os.environ["TENANT_SHARD_SIZE"] = str(shard_size)
    get_settings.cache_clear()
    try:
        token = await sealed_token(
            stack.config,
            DEMO_OPERATOR,
            flow="nightly-rollup",
            client_ids=None,
            parameters={"day": day},
        )
        started = time.perf_counter()
        state = await nightly_rollup(day=day, access_token=token, return_state=True)
        seconds = time.perf_counter() - started
    finally:
        os.environ.pop("TENANT_SHARD_SIZE", None)
        get_settings.cache_clear()
    if not state.is_completed():
        raise RuntimeError(f"the sharded nightly-rollup ended {state.name}: {state.message}")
    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id]
                )
            )
        )
    return seconds, state, children


async def shard_rows(stack: Stack) -> list[Row]:
    day = (datetime.now(UTC) - timedelta(days=61)).date()
    budget = get_settings().db_concurrency_slots
    say(f"\n## a sweep in shards, two workers on the pool (shards of {SHARD_SIZE:,} clients)")
    await create_clients(stack.config, SHARD_CLIENTS, day)
    second = LocalWorker(
        stack.config,
        worker_name="tenantflow-bench-second",
        root=stack.config.stack_dir / "worker-bench",
    )
    try:
        await asyncio.to_thread(second.start)
        async with sample_connections(stack.config) as peak:
            seconds, _, children = await _sweep(stack, day, SHARD_SIZE)
        unsharded, _, _ = await _sweep(stack, day, 10 * SHARD_CLIENTS)
    finally:
        await asyncio.to_thread(second.stop)
        removed = await remove_clients(stack.config)
        say(f"  removed the {removed} benchmark clients")
    workers: dict[str, list[str]] = {}
    for child in sorted(children, key=lambda run: run.name):
        workers.setdefault(child.labels.get("prefect.worker.name", "?"), []).append(child.name)
    for worker, runs in sorted(workers.items()):
        say(f"  {worker}: {', '.join(runs)}")
    say(
        f"  sharded sweep {seconds:.1f}s in {len(children)} shard runs; one flow run "
        f"{unsharded:.1f}s; peak busy/open server connections {peak.busy}/{peak.open}, "
        f"budget {budget}"
    )
    return [
        Row(
            f"sharded sweep of {SHARD_CLIENTS:,} clients, 2 workers (s)",
            f"{seconds:.1f} ({len(children)} shards on {len(workers)} workers)",
            f"{unsharded:.1f} (one flow run)",
            ratio(unsharded, seconds),
            "shards on both workers",
            len(workers) == 2,
        ),
        Row(
            "peak server connections, sharded sweep",
            f"{peak.busy} busy / {peak.open} open",
            f"{budget} (DB_CONCURRENCY_SLOTS)",
            ratio(peak.busy, budget),
            "≤ 1.00x",
            peak.busy <= budget,
        ),
    ]
