"""The connection budget: tenant transactions within `tenantflow-db`.

A flow run takes its slots of the Prefect global concurrency limit once, for all of
its database work, and runs its tenant tasks on its own event loop, at most that
many at a time. Each acquisition is an API round trip, so slots are never taken per
statement; and since the limit is strict, a missing limit is an error rather than an
unlimited run.

The budget and how to size it: docs/connections.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TypeVar

from prefect.concurrency.asyncio import concurrency

from tenantflow.settings import Settings, get_settings

__all__ = [
    "database_slots",
    "gather_bounded",
    "held_slots",
    "one_transaction_slot",
    "transaction_slot",
]

T = TypeVar("T")
R = TypeVar("R")

# NOTE: a flow run's local gate: as many tenant transactions at once as it holds slots.
# Tenant work is awaited on the flow's own loop, where this semaphore lives.
_GATE: ContextVar[asyncio.Semaphore | None] = ContextVar("tenantflow_db_gate", default=None)
_SLOTS: ContextVar[int | None] = ContextVar("tenantflow_db_slots", default=None)


@asynccontextmanager
async def database_slots(wanted: int, *, settings: Settings | None = None) -> AsyncIterator[int]:
    """Hold `min(wanted, DB_FLOW_SLOTS)` slots of the global limit; yields how many."""
    settings = settings or get_settings()
    slots = max(1, min(wanted, settings.db_flow_slots))
    async with concurrency(
        settings.db_concurrency_limit,
        occupy=slots,
        strict=True,
        timeout_seconds=settings.db_slot_timeout_s,
        lease_duration=settings.db_slot_lease_s,
    ):
        token, count = _GATE.set(asyncio.Semaphore(slots)), _SLOTS.set(slots)
        try:
            yield slots
        finally:
            _SLOTS.reset(count)
            _GATE.reset(token)


def held_slots() -> int | None:
    """How many slots the current flow run holds (None outside `database_slots`)."""
    return _SLOTS.get()


@asynccontextmanager
async def transaction_slot() -> AsyncIterator[None]:
    """Wait for one of the flow run's slots (no-op outside `database_slots`)."""
    gate = _GATE.get()
    if gate is None:
        yield
        return
    async with gate:
        yield


@asynccontextmanager
async def one_transaction_slot(*, settings: Settings | None = None) -> AsyncIterator[None]:
    """A slot for one transaction outside a run's tenant work (the guard's own).

    Inside `database_slots` it is one of the run's slots; otherwise one slot of the global
    limit, held only while the transaction lasts. So the budget counts every transaction
    of the workers, and a run that is refused never held more than one slot, briefly.
    """
    if _GATE.get() is not None:
        async with transaction_slot():
            yield
        return
    settings = settings or get_settings()
    async with concurrency(
        settings.db_concurrency_limit,
        occupy=1,
        strict=True,
        timeout_seconds=settings.db_slot_timeout_s,
        lease_duration=settings.db_slot_lease_s,
    ):
        yield


async def gather_bounded(
    function: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int
) -> Sequence[R]:
    """Await `function(item)` for every item, at most `limit` at once, in order."""
    gate = asyncio.Semaphore(limit)

    async def one(item: T) -> R:
        async with gate:
            return await function(item)

    return await asyncio.gather(*(one(item) for item in items))
