"""`make bench`: the tenant sweep against its limit, the guard's cost, an operator's wait,
throughput through the poolers and the cost of task styles; as ratios, into
`bench/results.md`.

Each figure is printed against a baseline measured in the same run on the same
machine, so the numbers compare designs rather than machines. Nothing is asserted.
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import cast

from prefect import flow, task
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.api_latency import api_latency_rows
from bench.containers import container_rows
from bench.guard import guard_rows
from bench.image import image_rows
from bench.imports import import_rows
from bench.run_start import start_rows
from bench.shards import shard_rows
from bench.stackapi import on_stack
from bench.sweep import sweeps
from bench.table import Row, ratio, say, write
from bench.table import render as render_table
from tenantflow.db import build_transaction_engine, dispose_engines, session_scope, unit_of_work
from tenantflow.settings import get_settings, load_settings
from tenantflow_dev import Stack

TRANSACTIONS = int(os.environ.get("BENCH_TRANSACTIONS", "2000"))
CONCURRENCY = 10
TASKS = int(os.environ.get("BENCH_TASKS", "200"))
ROUNDS = 3


async def _transactions_per_second(engine: AsyncEngine) -> float:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(n: int) -> None:
        async with gate, session_scope(engine) as session:
            for q in range(5):
                await session.execute(text("SELECT CAST(:n AS int) + :q"), {"n": n, "q": q})

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(TRANSACTIONS)))
    return TRANSACTIONS / (time.perf_counter() - started)


async def _median(make: Callable[[], AsyncEngine]) -> float:
    results = []
    for _ in range(ROUNDS):
        engine = make()
        try:
            results.append(await _transactions_per_second(engine))
        finally:
            await engine.dispose()
    return statistics.median(results)


async def pooler_throughput(stack: Stack) -> list[Row]:
    say(
        f"\n## {TRANSACTIONS} transactions of 5 SELECTs, {CONCURRENCY} at a time (median of "
        f"{ROUNDS})"
    )
    direct = stack.config.direct_database_url
    baseline = await _median(
        lambda: create_async_engine(direct, pool_size=CONCURRENCY, max_overflow=0)
    )
    say(f"baseline  direct to PostgreSQL, SQLAlchemy defaults   {baseline:8.0f} tx/s  1.00x")
    rows = []
    for mode in ("queue", "null"):
        settings = load_settings(db_pool_mode=mode, db_pool_size=CONCURRENCY)
        rate = await _median(functools.partial(build_transaction_engine, settings))
        say(
            f"tenantflow transaction pooler, {mode:<5} pool           {rate:8.0f} tx/s  "
            f"{rate / baseline:.2f}x"
        )
        rows.append(
            Row(
                f"transaction pooler, {mode} pool (tx/s of 5 SELECTs)",
                f"{rate:,.0f}",
                f"{baseline:,.0f} (direct)",
                ratio(rate, baseline),
            )
        )
    return rows


@task(persist_result=False)
async def _probe(n: int) -> int:
    async with unit_of_work() as session:
        return int((await session.execute(text("SELECT CAST(:n AS int)"), {"n": n})).scalar_one())


@flow(persist_result=False)
async def _awaited() -> int:
    results: list[int] = await asyncio.gather(*(_probe(n) for n in range(TASKS)))
    return sum(results)


@flow(persist_result=False)
def _mapped() -> int:
    results = cast("list[int]", _probe.map(list(range(TASKS))).result())
    return sum(results)


async def task_styles() -> list[Row]:
    say(f"\n## {TASKS} tenant-style task runs, each one transaction")

    async def timed(run: Callable[[], Awaitable[object]]) -> float:
        started = time.perf_counter()
        await run()
        return TASKS / (time.perf_counter() - started)

    awaited = await timed(_awaited)
    await dispose_engines()
    mapped = await timed(lambda: asyncio.to_thread(_mapped))
    say(f"baseline  awaited on the flow's loop (tenantflow)    {awaited:8.1f} task runs/s  1.00x")
    say(
        f"          .map on the default task runner            {mapped:8.1f} task runs/s  "
        f"{mapped / awaited:.2f}x"
    )
    return [
        Row(
            ".map on the default task runner (task runs/s)",
            f"{mapped:.1f}",
            f"{awaited:.1f} (awaited on the flow's loop)",
            ratio(mapped, awaited),
        )
    ]


async def run(stack: Stack) -> None:
    started = time.perf_counter()
    say("# tenantflow benchmarks (ratios against the baseline of the same run)")
    rows: list[Row] = []
    rows += await sweeps(stack)
    rows += await shard_rows(stack)
    rows += await container_rows(stack)
    rows += await image_rows(stack)
    rows += await guard_rows(stack.config, get_settings())
    rows += await start_rows(stack)
    rows += await api_latency_rows(stack)
    rows += import_rows()
    rows += await pooler_throughput(stack)
    rows += await task_styles()
    await dispose_engines()
    seconds = time.perf_counter() - started
    write(rows, [], seconds)
    say("\n" + render_table(rows))
    say(f"\n{len(rows)} measures in {seconds:.0f}s; written to bench/results.md")


def main() -> None:
    on_stack(run)


if __name__ == "__main__":
    main()
