"""The Prefect API's latency under load: two API replicas behind HAProxy (the `ha`
topology) against the one server, the same loads on the same stack: 265 reads, then the
load test's 265 writes (`tests/prefect_load.py`: 8 flow runs of 10 task runs at once, each
taken through its states).

The load is what the stack's clients ask most (workers polling their pool, the UI and
the housekeeping listing and counting runs, launches reading a deployment, flows
reading the `tenantflow-db` limit), `CONCURRENCY` at a time, read-only so every round
asks the same of the same data. The stack is switched from its topology to the other
and back (`Stack.up` on the other topology stops this one's Prefect parts first); the
workers ride through the switch on their client's retries.

    python -m bench.api_latency    # on the stack the TENANTFLOW_* environment names

`make bench` runs it among the others (`bench/__main__.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx

from bench.stackapi import on_stack
from bench.table import Row, machine, ratio, render, say, update
from tenantflow.settings import load_fault_settings
from tenantflow_dev import Stack
from tenantflow_dev.config import PrefectTopology, StackConfig
from tenantflow_dev.errors import StackError
from tenantflow_dev.load_balancer import LoadBalancer
from tenantflow_dev.redis_server import RedisServer
from tests.prefect_load import FLOW_RUNS, TASK_RUNS_PER_FLOW_RUN, drive
from tests.prefect_load import REQUESTS as WRITES

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
#: Rounds of each load per topology (the machine may be busy with other work): the
#: round of the median wall time is the one shown.
ROUNDS = 3


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


async def _measured(config: StackConfig) -> dict[str, Latency]:
    """The read load after its warm-up, then the load test's writes, on `config`'s Prefect:
    `ROUNDS` of each, the round of the median wall time kept."""
    await load(config, requests=WARM_UP)
    reads = [await load(config) for _ in range(ROUNDS)]
    writes = []
    for _ in range(ROUNDS):
        done = await drive(config, flow="tenantflow-bench-api-latency")
        writes.append(Latency(done.seconds, done.wall))
    return {"reads": _median_round(reads), "writes": _median_round(writes)}


def _median_round(rounds: list[Latency]) -> Latency:
    return sorted(rounds, key=lambda found: found.wall)[len(rounds) // 2]


#: What each measured load is, for the rows.
LOADS = {
    "reads": f"{REQUESTS} reads ({CONCURRENCY} at a time)",
    "writes": (
        f"the load test's {WRITES} writes ({FLOW_RUNS} flow runs of "
        f"{TASK_RUNS_PER_FLOW_RUN} task runs at once)"
    ),
}


async def api_latency_rows(stack: Stack) -> list[Row]:
    say(
        f"\n## Prefect API: {LOADS['reads']}, then {LOADS['writes']}; "
        "2 replicas behind HAProxy against one server"
    )
    try:
        # NOTE: what the `ha` topology starts besides Prefect: Debian's packages.
        RedisServer(stack.config).argv()
        LoadBalancer(stack.config).argv()
    except StackError as missing:
        say(f"  not measured: {missing}")
        return []
    measured: dict[PrefectTopology, dict[str, Latency]] = {}
    for wanted in (stack.config.prefect_topology, _other(stack.config.prefect_topology)):
        async with topology(stack, wanted) as config:
            measured[wanted] = await _measured(config)
    rows = []
    for kind, what in LOADS.items():
        ha, single = measured["ha"][kind], measured["single"][kind]
        for name, found in (("one server", single), ("2 replicas + HAProxy", ha)):
            say(
                f"  {kind:<6} {name:<22} median {found.median_ms:6.1f} ms   "
                f"p95 {found.p95_ms:6.1f} ms   {len(found.seconds)} requests in "
                f"{found.wall:5.2f} s"
            )
        for figure, unit, mine, theirs in (
            ("median latency", "ms", ha.median_ms, single.median_ms),
            ("p95 latency", "ms", ha.p95_ms, single.p95_ms),
            ("wall time", "s", ha.wall, single.wall),
        ):
            rows.append(
                Row(
                    f"Prefect API, {what}, 2 replicas + HAProxy: {figure} ({unit})",
                    f"{mine:.1f}" if unit == "ms" else f"{mine:.2f}",
                    (f"{theirs:.1f}" if unit == "ms" else f"{theirs:.2f}") + " (one server)",
                    ratio(mine, theirs),
                )
            )
    return rows


def _other(topology: PrefectTopology) -> PrefectTopology:
    return "single" if topology == "ha" else "ha"


def main() -> None:
    """`python -m bench.api_latency`: this measure alone, into `bench/results.md`."""
    rows = on_stack(api_latency_rows)
    say("\n" + render(rows))
    update(rows, f"the API latency rows measured alone ({machine()})")


if __name__ == "__main__":
    main()
