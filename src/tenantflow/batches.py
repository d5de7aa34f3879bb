"""Tenant work in batches: one Prefect task run per batch of clients, one transaction each.

A Prefect task run costs far more than a client's transaction (its events, its states,
the server's work to record them), so a sweep over thousands of clients records one task
run per *batch* (`TENANT_BATCH_SIZE` clients) instead of one per client. Inside a batch
every client is still on its own:

* its own transaction, with its own claims and role (`tenant_session(ctx)` in the work);
* its own outcome: one client failing or timing out never fails the batch's others;
* its own retries: transient database faults (`is_transient_database_error`) are retried
  for that client for `TENANT_RETRY_WINDOW_S` (long enough to outlast a database restart
  or failover), with exponential backoff and jitter, never the whole batch; when the
  database is unreachable for everyone, the run's clients wait on one probe (`_Outage`)
  instead of each retrying, and resume once it answers;
* the flow run's database slots bound how many transactions run at once, whatever the
  batch size (the gate lives in `tenant_session`).

`run_for_clients()` is the building block every flow uses: a sweep of many clients and a
report of one are the same call.

Batches, retries and outcomes from an operator's side: docs/flows.md.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.utilities.annotations import quote

from tenantflow.budget import gather_bounded, held_slots
from tenantflow.db import (
    connection_lane,
    describe_error,
    is_database_unreachable,
    is_transient_database_error,
    lane_connections,
    ping,
)
from tenantflow.settings import get_settings
from tenantflow.tenancy import TenantContext

__all__ = ["BATCHES_IN_FLIGHT", "ClientOutcome", "ClientWork", "run_for_clients"]

R = TypeVar("R")

#: The work for one client: called with the guard's context, it opens its own
#: `tenant_session(ctx)` (one transaction) and returns what the flow reports.
ClientWork = Callable[[TenantContext], Awaitable[R]]

#: Batches awaited at once: two, so one batch's task-run bookkeeping with the Prefect API
#: (its start, its end, the progress artifact: tens of ms each) overlaps the other's
#: transactions instead of leaving the run's slots idle between batches. Both batches'
#: lanes share the run's slots (`transaction_slot` in `tenant_session`), so no more
#: transactions run at once than the run holds slots; a lane waiting for a slot holds
#: only its client connection, which through the transaction pooler holds no server one.
BATCHES_IN_FLIGHT = 2
_BACKOFF_START_S = 0.5
_BACKOFF_CAP_S = 8.0


@dataclass(frozen=True)
class ClientOutcome(Generic[R]):
    """What happened to one client: its value, or why it failed (safe to show)."""

    client_id: UUID
    client_name: str
    value: R | None = None
    error: str | None = None
    seconds: float = 0.0
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


def _backoff(attempt: int) -> float:
    """Seconds before retry number `attempt` (1, 2, ...): exponential, capped, jittered."""
    delay: float = min(_BACKOFF_CAP_S, _BACKOFF_START_S * 2.0 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not secrecy


class _Outage:
    """The database is down for everyone: one probe for the whole run, not one retry loop
    per client. Clients that hit the outage wait for the same probe, then retry."""

    def __init__(self) -> None:
        self._probe: asyncio.Future[bool] | None = None

    async def wait_until_back(self, deadline: float) -> bool:
        """True once the database answers again; False if `deadline` passes first."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_until(deadline))
        return await asyncio.shield(self._probe)

    @staticmethod
    async def _probe_until(deadline: float) -> bool:
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            await asyncio.sleep(min(_backoff(attempt), max(0.0, deadline - time.monotonic())))
            try:
                await ping()
            except Exception as error:
                if not is_transient_database_error(error):
                    return False
                continue
            return True
        return False


async def _one_client(
    ctx: TenantContext,
    work: ClientWork[R],
    *,
    retry_window_s: float,
    timeout_s: float,
    outage: _Outage,
) -> ClientOutcome[R]:
    started = time.perf_counter()
    retry_until = time.monotonic() + retry_window_s
    attempt = 0
    while True:
        attempt += 1
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                value = await work(ctx)
        except Exception as error:
            reason = None
            if deadline.expired():
                reason = f"timed out after {timeout_s:g}s"
            elif not is_transient_database_error(error):
                reason = describe_error(error)
            elif time.monotonic() >= retry_until:
                reason = f"still failing after {retry_window_s:g}s: {describe_error(error)}"
            elif is_database_unreachable(error):
                if await outage.wait_until_back(retry_until):
                    continue
                reason = f"database unreachable for {retry_window_s:g}s: {describe_error(error)}"
            else:
                await asyncio.sleep(_backoff(attempt))
                continue
            return ClientOutcome(
                ctx.client_id,
                ctx.client_name,
                error=reason,
                seconds=time.perf_counter() - started,
                attempts=attempt,
            )
        return ClientOutcome(
            ctx.client_id,
            ctx.client_name,
            value=value,
            seconds=time.perf_counter() - started,
            attempts=attempt,
        )


@task(
    name="tenant-batch",
    task_run_name="{name}[{label}]",
    persist_result=False,
    cache_policy=NO_CACHE,
    retries=0,
)
async def _batch(
    name: str,
    label: str,
    contexts: Sequence[TenantContext],
    work: ClientWork[Any],
    retry_window_s: float,
    timeout_s: float,
    outage: _Outage,
) -> list[ClientOutcome[Any]]:
    """One task run for a batch of clients; every client on its own (its transaction, its
    retries, its outcome), as many at once as the run holds database slots. Never raises
    for a client's failure.

    NOTE: no result is persisted or cached (it may hold client data), and no tags: each
    tagged task run asks the API for tag concurrency slots.
    """
    outcomes: list[ClientOutcome[Any] | None] = [None] * len(contexts)
    queue = iter(enumerate(contexts))

    async def lane() -> None:
        # NOTE: one connection per lane, clients one after another on it (each its own
        # transaction): as many lanes as the run holds slots; with the other batch in
        # flight, its lanes take the slots this batch's lanes leave as it runs out.
        async with connection_lane():
            for index, ctx in queue:
                outcomes[index] = await _one_client(
                    ctx, work, retry_window_s=retry_window_s, timeout_s=timeout_s, outage=outage
                )

    lanes = min(len(contexts), held_slots() or get_settings().db_flow_slots)
    await asyncio.gather(*(lane() for _ in range(lanes)))
    return [outcome for outcome in outcomes if outcome is not None]


def _batch_failed(contexts: Sequence[TenantContext], state: State[Any]) -> list[ClientOutcome[Any]]:
    reason = f"its batch failed: {state.message or state.name}"
    return [ClientOutcome(c.client_id, c.client_name, error=reason[:300]) for c in contexts]


async def run_for_clients(
    contexts: Sequence[TenantContext],
    work: ClientWork[R],
    *,
    name: str,
    batch_size: int | None = None,
    retry_window_s: float | None = None,
    timeout_s: float | None = None,
    on_batch_done: Callable[[Sequence[ClientOutcome[R]]], Awaitable[None]] | None = None,
) -> list[ClientOutcome[R]]:
    """Run `work` for every client, in batches of task runs, awaited on this event loop.

    Args:
        contexts: the guard's contexts, one per client.
        work: what to do for one client (one transaction through `tenant_session`).
        name: the task runs' name, e.g. `rollup` gives `rollup[3/50]`.
        batch_size: clients per task run (default `TENANT_BATCH_SIZE`).
        retry_window_s: how long a client's transient faults are retried
            (`TENANT_RETRY_WINDOW_S`); an outage for everyone waits on one probe instead.
        timeout_s: time one attempt of one client may take (`TENANT_CLIENT_TIMEOUT_S`).
        on_batch_done: awaited with each batch's outcomes as it finishes (progress).

    Returns:
        One outcome per context, in the contexts' order.
    """
    settings = get_settings()
    size = batch_size or settings.tenant_batch_size
    if retry_window_s is None:
        retry_window_s = settings.tenant_retry_window_s
    outage = _Outage()
    timeout_s = timeout_s or settings.tenant_client_timeout_s
    batches = [list(contexts[i : i + size]) for i in range(0, len(contexts), size)]

    async def one(numbered: tuple[int, list[TenantContext]]) -> list[ClientOutcome[R]]:
        index, batch = numbered
        # NOTE: awaited on this loop (not .submit/.map): far cheaper, one engine per loop.
        state = await cast(
            "Awaitable[State[list[ClientOutcome[R]]]]",
            _batch(
                name,
                f"{index + 1}/{len(batches)}",
                # NOTE: quoted, so Prefect hands the list over as it is instead of walking
                # every context in it (twice: resolving inputs, recording them), which
                # cost more CPU per client than its transaction's Python side.
                cast("Sequence[TenantContext]", quote(batch)),
                work,
                retry_window_s,
                timeout_s,
                outage,
                return_state=True,
            ),
        )
        outcomes = await state.aresult(raise_on_failure=False)
        if not isinstance(outcomes, list):
            outcomes = _batch_failed(batch, state)
        if on_batch_done is not None:
            await on_batch_done(outcomes)
        return outcomes

    async with lane_connections():
        done = await gather_bounded(one, list(enumerate(batches)), BATCHES_IN_FLIGHT)
    return [outcome for batch in done for outcome in batch]
