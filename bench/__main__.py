"""`make bench`: throughput through the poolers and cost of task styles, as ratios.

Each figure is printed against a baseline measured in the same run on the same
machine, so the numbers compare designs rather than machines. Nothing is asserted.
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import cast

from prefect import flow, task
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tenantflow.db import build_transaction_engine, dispose_engines, session_scope, unit_of_work
from tenantflow.localstack import Stack
from tenantflow.settings import get_settings, load_settings

TRANSACTIONS = int(os.environ.get("BENCH_TRANSACTIONS", "2000"))
CONCURRENCY = 10
TASKS = int(os.environ.get("BENCH_TASKS", "200"))
ROUNDS = 3


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


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


async def pooler_throughput(stack: Stack) -> None:
    say(
        f"\n## {TRANSACTIONS} transactions of 5 SELECTs, {CONCURRENCY} at a time (median of "
        f"{ROUNDS})"
    )
    direct = stack.config.direct_database_url
    baseline = await _median(
        lambda: create_async_engine(direct, pool_size=CONCURRENCY, max_overflow=0)
    )
    say(f"baseline  direct to PostgreSQL, SQLAlchemy defaults   {baseline:8.0f} tx/s  1.00x")
    for mode in ("queue", "null"):
        settings = load_settings(db_pool_mode=mode, db_pool_size=CONCURRENCY)
        rate = await _median(functools.partial(build_transaction_engine, settings))
        say(
            f"tenantflow transaction pooler, {mode:<5} pool           {rate:8.0f} tx/s  "
            f"{rate / baseline:.2f}x"
        )


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


async def task_styles() -> None:
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


async def run(stack: Stack) -> None:
    say("# tenantflow benchmarks (ratios against the baseline of the same run)")
    await pooler_throughput(stack)
    await task_styles()
    await dispose_engines()


def main() -> None:
    stack = Stack()
    if not all(part.healthy for part in stack.status()):
        stack.up()
    os.environ.update(stack.config.environment())
    get_settings.cache_clear()
    asyncio.run(run(stack))


if __name__ == "__main__":
    main()
