"""The connection budget (DESIGN.md §1): tenant transactions within `tenantflow-db`.

A flow run takes its slots of the Prefect global concurrency limit once, for all of
its database work, and runs its tenant tasks on its own event loop, at most that
many at a time. Each acquisition is an API round trip, so slots are never taken per
statement; and since the limit is strict, a missing limit is an error rather than an
unlimited run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from prefect.concurrency.asyncio import concurrency

from tenantflow.settings import Settings, get_settings

__all__ = ["database_slots", "gather_bounded"]

T = TypeVar("T")
R = TypeVar("R")


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
    ):
        yield slots


async def gather_bounded(
    function: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int
) -> Sequence[R]:
    """Await `function(item)` for every item, at most `limit` at once, in order."""
    gate = asyncio.Semaphore(limit)

    async def one(item: T) -> R:
        async with gate:
            return await function(item)

    return await asyncio.gather(*(one(item) for item in items))
