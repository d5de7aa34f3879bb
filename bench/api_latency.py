"""The Prefect API's latency under load: two API replicas behind HAProxy (the `ha`
topology) against the one server, the same 265 requests on the same stack.

The load is what the stack's clients ask most (workers polling their pool, the UI and
the housekeeping listing and counting runs, launches reading a deployment, flows
reading the `tenantflow-db` limit), `CONCURRENCY` at a time, read-only so every round
asks the same of the same data. The stack is switched from its topology to the other
and back (`Stack.up` on the other topology stops this one's Prefect parts first); the
workers ride through the switch on their client's retries.

    python -m bench.api_latency    # on the stack the TENANTFLOW_* environment names
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx

from bench.table import Row, ratio, say
from tenantflow.settings import load_fault_settings
from tenantflow_dev import Stack
from tenantflow_dev.config import PrefectTopology, StackConfig

#: (count, method, path, JSON body): 265 requests.
LOAD: tuple[tuple[int, str, str, object], ...] = (
    (60, "POST", "/work_pools/tenantflow-process/get_scheduled_flow_runs", {}),
    (80, "POST", "/flow_runs/filter", {"limit": 20, "sort": "EXPECTED_START_TIME_DESC"}),
    (40, "POST", "/flow_runs/count", {}),
    (50, "GET", "/deployments/name/nightly-rollup/nightly-rollup", None),
    (25, "GET", "/v2/concurrency_limits/{limit}", None),
    (10, "GET", "/health", None),
)
REQUESTS = sum(count for count, *_ in LOAD)
CONCURRENCY = 10
#: Requests before each measured round (connections, the servers' caches).
WARM_UP = 30
#: Seconds a topology just switched to is left alone before it is measured.
SETTLE_S = 15


@dataclasses.dataclass(frozen=True)
class Latency:
    """One round of the load: each request's seconds, and the round's wall time."""

    seconds: list[float]
    wall: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def p95_ms(self) -> float:
        return statistics.quantiles(self.seconds, n=20)[-1] * 1000


def _requests() -> Iterator[tuple[str, str, object]]:
    limit = load_fault_settings().db_concurrency_limit
    # NOTE: interleaved, as the clients' requests come, not one kind after the other.
    queue = [(count, method, path.format(limit=limit), body) for count, method, path, body in LOAD]
    while any(count for count, *_ in queue):
        for index, (count, method, path, body) in enumerate(queue):
            if count:
                queue[index] = (count - 1, method, path, body)
                yield method, path, body


async def load(config: StackConfig, *, requests: int = REQUESTS) -> Latency:
    """The load (its first `requests`) against the stack's Prefect API; every answer 200."""
    gate = asyncio.Semaphore(CONCURRENCY)
    seconds: list[float] = []
    async with httpx.AsyncClient(
        base_url=config.prefect_api_url, headers=config.prefect_api_headers(), timeout=30
    ) as client:

        async def one(method: str, path: str, body: object) -> None:
            async with gate:
                started = time.perf_counter()
                response = await client.request(method, path, json=body)
                seconds.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")

        began = time.perf_counter()
        work = [one(*request) for _, request in zip(range(requests), _requests(), strict=False)]
        await asyncio.gather(*work)
    return Latency(seconds, time.perf_counter() - began)


@asynccontextmanager
async def topology(stack: Stack, wanted: PrefectTopology) -> AsyncIterator[StackConfig]:
    """The stack's Prefect on `wanted`, and back to what it was afterwards.

    NOTE: `Stack.up` runs its own event loops (the database checks): in a thread.
    """
    was = stack.config.prefect_topology
    other = Stack(dataclasses.replace(stack.config, prefect_topology=wanted))
    if wanted != was:
        await asyncio.to_thread(other.up, setup=False)
        # NOTE: a Prefect just started runs its services' first passes (scheduler, late
        # runs, ...) at once; the one it is measured against has long been past them.
        await asyncio.sleep(SETTLE_S)
    try:
        yield other.config
    finally:
        if wanted != was:
            await asyncio.to_thread(Stack(stack.config).up, setup=False)


async def _measured(config: StackConfig) -> Latency:
    await load(config, requests=WARM_UP)
    return await load(config)


async def api_latency_rows(stack: Stack) -> list[Row]:
    say(
        f"\n## Prefect API under {REQUESTS} requests, {CONCURRENCY} at a time: "
        "2 replicas behind HAProxy against one server"
    )
    measured: dict[PrefectTopology, Latency] = {}
    for wanted in (stack.config.prefect_topology, _other(stack.config.prefect_topology)):
        async with topology(stack, wanted) as config:
            measured[wanted] = await _measured(config)
    ha, single = measured["ha"], measured["single"]
    for name, found in (("one server", single), ("2 replicas + HAProxy", ha)):
        say(
            f"  {name:<22} median {found.median_ms:6.1f} ms   p95 {found.p95_ms:6.1f} ms   "
            f"{REQUESTS} requests in {found.wall:5.2f} s"
        )
    return [
        Row(
            f"Prefect API, {REQUESTS} requests ({CONCURRENCY} at a time), 2 replicas + "
            "HAProxy: median latency (ms)",
            f"{ha.median_ms:.1f}",
            f"{single.median_ms:.1f} (one server)",
            ratio(ha.median_ms, single.median_ms),
        ),
        Row(
            f"Prefect API, {REQUESTS} requests, 2 replicas + HAProxy: p95 latency (ms)",
            f"{ha.p95_ms:.1f}",
            f"{single.p95_ms:.1f} (one server)",
            ratio(ha.p95_ms, single.p95_ms),
        ),
        Row(
            f"Prefect API, {REQUESTS} requests, 2 replicas + HAProxy: wall time (s)",
            f"{ha.wall:.2f}",
            f"{single.wall:.2f} (one server)",
            ratio(ha.wall, single.wall),
        ),
    ]


def _other(topology: PrefectTopology) -> PrefectTopology:
    return "single" if topology == "ha" else "ha"


def main() -> None:
    stack = Stack()
    if not all(part.healthy for part in stack.status()):
        stack.up(setup=True)
    rows = asyncio.run(api_latency_rows(stack))
    for row in rows:
        say(" | ".join(row.cells()))


if __name__ == "__main__":
    main()
