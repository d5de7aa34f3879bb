"""Large sweeps in shards: child flow runs through the work pool, one per slice of clients.

A sweep of more than `TENANT_SHARD_SIZE` clients splits them into shards. Each shard is
a flow run of the `nightly-rollup-shard` deployment, so any worker of the pool (on any
machine, process, docker or kubernetes) can take it; each takes its own database slots
from the global `tenantflow-db` limit, so the budget holds across all of them.

How a shard is started (`_start`): the child run is created scheduled an hour ahead (no
worker takes it yet), the parent writes its grant keyed by the child's run id
(`tenancy.delegate_shard`), then the run is rescheduled for now. The child reads only
that grant (`tenancy.authorize_shard`), never its parameters.

The parent holds no database slots while it waits (its children need them). A shard
that crashes or fails is retried alone, `TENANT_SHARD_ATTEMPTS` times in all: a shard
that recorded its outcome is retried with its failed clients only, one that never got
that far with all of its clients. The parent then names every client that failed.

Shards from an operator's side: docs/flows.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments.flow_runs import arun_deployment
from prefect.states import Scheduled

from tenantflow.settings import get_settings
from tenantflow.tenancy import TenantContext, delegate_shard, read_shard_result

__all__ = ["SHARD_DEPLOYMENT", "ShardOutcome", "run_in_shards"]

SHARD_DEPLOYMENT = "nightly-rollup-shard/nightly-rollup-shard"
_POLL_S = 2.0
_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class ShardOutcome:
    """One shard over all of its attempts."""

    label: str
    clients: int
    runs: list[UUID] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    ok_clients: int = 0
    events: int = 0
    failed: list[TenantContext] = field(default_factory=list)

    def row(self) -> dict[str, str | int]:
        return {
            "shard": self.label,
            "clients": self.clients,
            "ok": self.ok_clients,
            "failed": len(self.failed),
            "events": self.events,
            "attempts": len(self.runs),
            "runs": ", ".join(
                f"{run} ({state})" for run, state in zip(self.runs, self.states, strict=True)
            ),
        }


async def _start(
    contexts: Sequence[TenantContext], *, day: date, label: str, attempt: int, parent_run_id: UUID
) -> FlowRun:
    later = datetime.now(UTC) + timedelta(hours=1)
    run = await arun_deployment(
        SHARD_DEPLOYMENT,
        parameters={},
        scheduled_time=later,
        flow_run_name=f"shard-{label.replace('/', '-of-')}-{day}-attempt-{attempt}",
        timeout=0,
        as_subflow=True,
        tags=["shard"],
    )
    await delegate_shard(
        contexts,
        child_run_id=run.id,
        parent_run_id=parent_run_id,
        action="nightly-rollup",
        day=day,
        shard=label,
    )
    async with get_client() as client:
        await client.set_flow_run_state(run.id, Scheduled(), force=True)
    return run


async def _final_state(run_id: UUID) -> str:
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(run_id)
            if run.state is not None and run.state.type.value in _FINAL:
                return run.state.type.value
            await asyncio.sleep(_POLL_S)


async def _one_shard(
    contexts: list[TenantContext], *, day: date, label: str, parent_run_id: UUID, attempts: int
) -> ShardOutcome:
    outcome = ShardOutcome(label, len(contexts))
    remaining = contexts
    for attempt in range(1, attempts + 1):
        run = await _start(
            remaining, day=day, label=label, attempt=attempt, parent_run_id=parent_run_id
        )
        outcome.runs.append(run.id)
        outcome.states.append(await _final_state(run.id))
        result = await read_shard_result(run.id)
        if result.finished:
            outcome.ok_clients += result.ok_clients
            outcome.events += result.events
            failed = set(result.failed_client_ids)
            remaining = [c for c in remaining if c.client_id in failed]
        if not remaining:
            break
    outcome.failed = remaining
    return outcome


async def run_in_shards(
    contexts: Sequence[TenantContext], day: date, *, parent_run_id: UUID
) -> list[ShardOutcome]:
    """Roll `contexts` up in shard runs of `TENANT_SHARD_SIZE` clients; wait for all."""
    settings = get_settings()
    if not contexts:
        return []
    # NOTE: as many shards as TENANT_SHARD_SIZE asks for, of even sizes (10,003 clients
    # in shards of 5,000 make three of 3,335, not two of 5,000 and one of 3).
    count = -(-len(contexts) // settings.tenant_shard_size)
    size = -(-len(contexts) // count)
    shards = [list(contexts[i : i + size]) for i in range(0, len(contexts), size)]
    gate = asyncio.Semaphore(settings.tenant_shards_in_flight)

    async def one(index: int, shard: list[TenantContext]) -> ShardOutcome:
        async with gate:
            return await _one_shard(
                shard,
                day=day,
                label=f"{index + 1}/{len(shards)}",
                parent_run_id=parent_run_id,
                attempts=settings.tenant_shard_attempts,
            )

    return list(await asyncio.gather(*(one(i, shard) for i, shard in enumerate(shards))))
