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
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TypeVar
from uuid import UUID

import anyio
import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.concurrency._events import (
    emit_concurrency_acquisition_events,
    emit_concurrency_release_events,
)
from prefect.concurrency.asyncio import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencySlotAcquisitionError,
)
from prefect.logging.loggers import get_logger

from tenantflow.errors import TenantflowError
from tenantflow.settings import Settings, get_settings

__all__ = [
    "DatabaseSlotsLost",
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
_OUTSIDE_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


#: A lease is renewed when this share of it has passed, and a failed renewal retried
#: this many times, a few seconds apart, before the slots count as lost.
_RENEW_AT = 0.75
_RENEW_ATTEMPTS = 3
_RENEW_RETRY_S = 2.0


class DatabaseSlotsLost(TenantflowError, RuntimeError):
    """The lease on the run's database slots could not be renewed: they may be given to
    others, so the run stops instead of going on beyond the budget."""


@asynccontextmanager
async def _leased(settings: Settings, occupy: int) -> AsyncIterator[None]:
    """`occupy` slots of the global limit under a lease, for as long as the block runs.

    NOTE: Prefect's `concurrency()` does the same through an acquisition thread with an
    API client of its own (about 100 ms for a process's first acquisition, and every
    acquisition waits for the one before), plus a renewal thread with another client per
    acquisition that renews at once: three API calls and tens of ms for each of the
    guard's one-statement transactions. Here the run's own API client asks, waits as
    Prefect's does while the limit is full (the server's `Retry-After`), refuses a
    missing limit, renews the lease on the run's loop when three quarters of it have
    passed, and releases it, even when the block was cancelled.
    """
    async with get_client() as client:
        granted = await _acquire(client, settings, occupy)
        # NOTE: from here to the release no await runs outside the try, so a cancellation
        # cannot lose the lease between its grant and its release.
        emitted = emit_concurrency_acquisition_events(granted.limits, occupy)
        try:
            owner = asyncio.current_task()
            lost: list[BaseException] = []
            renewal = asyncio.create_task(
                _renew(granted.lease_id, settings.db_slot_lease_s, owner, lost),
                name="tenantflow-db-lease",
            )
            try:
                yield
            except asyncio.CancelledError:
                if lost:
                    raise DatabaseSlotsLost(
                        f"the lease on this run's {occupy} database slot(s) could not be "
                        f"renewed ({type(lost[0]).__name__}); the run stopped rather than "
                        "exceed the budget"
                    ) from None
                raise
            finally:
                renewal.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await client.release_concurrency_slots_with_lease(granted.lease_id)
            emit_concurrency_release_events(granted.limits, occupy, emitted)


async def _acquire(
    client: PrefectClient, settings: Settings, occupy: int
) -> ConcurrencyLimitWithLeaseResponse:
    names = [settings.db_concurrency_limit]
    try:
        with anyio.fail_after(settings.db_slot_timeout_s):
            while True:
                try:
                    granted = await _request_slots(client, names, occupy, settings.db_slot_lease_s)
                except httpx.HTTPStatusError as error:
                    if error.response.status_code != httpx.codes.LOCKED:
                        raise ConcurrencySlotAcquisitionError(
                            f"Unable to acquire concurrency slots on {names!r}: "
                            f"{error.response.status_code} {error.response.reason_phrase}"
                        ) from None
                    await asyncio.sleep(float(error.response.headers.get("Retry-After", 1)))
                    continue
                break
    except TimeoutError:
        raise AcquireConcurrencySlotTimeoutError(
            f"Attempt to acquire concurrency slots timed out after "
            f"{settings.db_slot_timeout_s:g} second(s)"
        ) from None
    if not granted.limits:
        raise ConcurrencySlotAcquisitionError(
            f"Concurrency limits {names!r} must be created before acquiring slots"
        )
    return granted


async def _request_slots(
    client: PrefectClient, names: list[str], occupy: int, lease_s: float
) -> ConcurrencyLimitWithLeaseResponse:
    """One request for slots; shielded, so a lease the server grants is never lost to a
    cancellation on the way back (the caller releases it)."""
    with anyio.CancelScope(shield=True):
        response = await client.increment_concurrency_slots_with_lease(
            names=names, slots=occupy, mode="concurrency", lease_duration=lease_s
        )
    return ConcurrencyLimitWithLeaseResponse.model_validate(response.json())


async def _renew(
    lease_id: UUID, lease_s: float, owner: asyncio.Task[object] | None, lost: list[BaseException]
) -> None:
    async with get_client() as client:
        while True:
            await asyncio.sleep(lease_s * _RENEW_AT)
            for attempt in range(1, _RENEW_ATTEMPTS + 1):
                try:
                    await client.renew_concurrency_lease(lease_id, lease_duration=lease_s)
                    break
                except Exception as error:
                    if attempt == _RENEW_ATTEMPTS:
                        get_logger("tenantflow.budget").error(
                            "renewing the lease on the database slots failed %d times (%s)",
                            attempt,
                            type(error).__name__,
                        )
                        lost.append(error)
                        if owner is not None:
                            owner.cancel()
                        return
                    await asyncio.sleep(_RENEW_RETRY_S * attempt)


@asynccontextmanager
async def database_slots(wanted: int, *, settings: Settings | None = None) -> AsyncIterator[int]:
    """Hold `min(wanted, DB_FLOW_SLOTS)` slots of the global limit; yields how many."""
    settings = settings or get_settings()
    slots = max(1, min(wanted, settings.db_flow_slots))
    async with _leased(settings, slots):
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
    # NOTE: one at a time per event loop (a flow-run process runs one run): the guard's
    # transactions may be started at once (the seal's claim while the operator grant is
    # read), and a run outside its slots never holds more than one.
    loop = asyncio.get_running_loop()
    one_at_a_time = _OUTSIDE_SLOTS.get(loop)
    if one_at_a_time is None:
        one_at_a_time = _OUTSIDE_SLOTS[loop] = asyncio.Lock()
    async with one_at_a_time, _leased(settings or get_settings(), 1):
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
