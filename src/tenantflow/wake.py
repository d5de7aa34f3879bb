"""The worker woken by Prefect's events for its pool, instead of waiting for its next poll.

Prefect's worker asks the API for due flow runs every `PREFECT_WORKER_QUERY_SECONDS` (10 s
by default): a run created just after a poll waits that long before anything starts it.
The server already announces every flow-run state change on its event stream, with the
run's work pool among the related resources. `wake_on_events` subscribes to those events
for the worker's pool (Prefect's own `PrefectEventSubscriber`, the websocket the UI uses),
but for the steps of a run's start (`NO_NEW_WORK`), and, when one comes, has the worker
poll at once (`get_and_submit_flow_runs`).

An event is only a nudge: the worker then asks the API for due runs exactly as its poll
does, and runs only what that answer and its locks allow. Whoever can post events to the
API can at most make the worker poll more often, and woken polls are spaced by
`MIN_WAKE_GAP_S` (a burst of events is one poll). The regular poll stays: a missed event,
or a stream that is down (reconnected with a growing pause, said once in the worker's
log), costs at most one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["MIN_WAKE_GAP_S", "NO_NEW_WORK", "PoolWorker", "wake_on_events"]

#: A run's steps through a worker: none of them makes a run due, so none wakes the worker.
#: A poll there would only compete with the run's own start for the API; a run that
#: becomes due (Scheduled, Late, AwaitingRetry, ...) or ends (a worker's or a pool's
#: concurrency freed) still does.
NO_NEW_WORK = (
    "prefect.flow-run.Pending",
    "prefect.flow-run.Submitting",
    "prefect.flow-run.Running",
)

log = logging.getLogger("tenantflow.wake")

#: The least time between two polls the events start.
MIN_WAKE_GAP_S = 0.1
#: Longest pause before the worker tries the event stream again.
_MAX_RECONNECT_PAUSE_S = 30.0


class PoolWorker(Protocol):
    """What `wake_on_events` needs of a worker."""

    draining: bool

    async def get_and_submit_flow_runs(self) -> Any: ...

    @property
    def work_pool(self) -> Any: ...


async def wake_on_events(worker: PoolWorker, say: Callable[[str], None]) -> None:
    """Poll `worker` whenever a flow run of its pool changes state; runs until cancelled."""
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    pool = await _pool_of(worker)
    event_filter = EventFilter(
        event=EventNameFilter(prefix=["prefect.flow-run."], exclude_name=list(NO_NEW_WORK)),
        related=EventRelatedFilter(id=[f"prefect.work-pool.{pool.id}"]),
    )
    woken = asyncio.Event()
    poller = asyncio.create_task(_poll_when_woken(worker, woken), name="wake-poll")
    pause = 1.0
    down = False
    try:
        while True:
            try:
                async with get_events_subscriber(
                    filter=event_filter, reconnect_on_clean_close=True
                ) as events:
                    if down:
                        say("the event stream is back: flow runs start as they are created")
                    down, pause = False, 1.0
                    woken.set()  # a run created while the stream was being opened
                    async for _ in events:
                        woken.set()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not down:
                    say(
                        "the event stream is unavailable "
                        f"({type(error).__name__}); flow runs start at the next poll "
                        "until it is back"
                    )
                down = True
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_RECONNECT_PAUSE_S)
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await poller


async def _pool_of(worker: PoolWorker) -> Any:
    """The worker's pool, once its first sync with the API has read it."""
    while True:
        with contextlib.suppress(RuntimeError):  # Prefect's: "not correctly initialized"
            return worker.work_pool
        await asyncio.sleep(0.1)


async def _poll_when_woken(worker: PoolWorker, woken: asyncio.Event) -> None:
    while True:
        await woken.wait()
        woken.clear()
        if not worker.draining:
            await _quietly(worker.get_and_submit_flow_runs())
        await asyncio.sleep(MIN_WAKE_GAP_S)


async def _quietly(poll: Awaitable[Any]) -> None:
    # NOTE: a failed woken poll is the regular poll's to report (with its back-off); this
    # one only logs it for whoever debugs.
    try:
        await poll
    except Exception:
        log.debug("woken poll failed", exc_info=True)
