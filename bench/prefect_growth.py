"""How much the stack's Prefect database grows per run: `python -m bench.prefect_growth`.

Against the running stack (PostgreSQL mode): `pg_database_size('prefect')` before and
after one `nightly-rollup` run through its deployment and the worker (as `make up` runs
it), then before and after one flow run with `BENCH_TASKS` (200) task runs. Sizes are read
once the server's recorders have written everything (row counts and size stable).
Nothing is asserted.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from tenantflow_dev import Stack, StackConfig

CONFIG = StackConfig.from_env()
# NOTE: before Prefect is imported: flows below must report to the stack's server.
os.environ.update(CONFIG.environment())

import asyncpg  # noqa: E402
from prefect import flow, task  # noqa: E402

TASKS = int(os.environ.get("BENCH_TASKS", "200"))
TABLES = ("flow_run", "task_run", "log", "events", "event_resources", "artifact")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _measure() -> tuple[int, dict[str, int]]:
    """The database's size, and per table its row count and size (indexes, TOAST)."""
    parts = CONFIG.connect_parts(CONFIG.pg_port, admin=True)
    conn = await asyncpg.connect(**{**parts, "database": "prefect"})
    try:
        size: int = await conn.fetchval("SELECT pg_database_size('prefect')")
        counts = {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}
        for t in TABLES:
            counts[f"{t} bytes"] = int(await conn.fetchval("SELECT pg_total_relation_size($1)", t))
    finally:
        await conn.close()
    return size, counts


def settled() -> tuple[int, dict[str, int]]:
    """Size and row counts once three readings two seconds apart agree (at most 90 s)."""
    readings = [asyncio.run(_measure())]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        time.sleep(2)
        readings.append(asyncio.run(_measure()))
        if len(readings) >= 3 and readings[-1] == readings[-2] == readings[-3]:
            break
    return readings[-1]


@task
def _unit(n: int) -> int:
    return n * 2


@flow(name="prefect-growth-probe")
def _many_tasks(count: int) -> int:
    return sum(_unit(n) for n in range(count))


def _report(
    what: str, before: tuple[int, dict[str, int]], after: tuple[int, dict[str, int]]
) -> int:
    grown = after[0] - before[0]
    say(f"{what}: database +{grown / 1024:.0f} KiB")
    for t in TABLES:
        rows = after[1][t] - before[1][t]
        kib = (after[1][f"{t} bytes"] - before[1][f"{t} bytes"]) / 1024
        say(f"  {t:<16} +{rows:>5} rows  +{kib:>6.0f} KiB (table, indexes, TOAST)")
    return grown


def main() -> None:
    if CONFIG.prefect_database != "postgres":
        raise SystemExit("the stack's Prefect server does not use PostgreSQL")
    before = settled()
    say(f"prefect database: {before[0] / 1024 / 1024:.1f} MiB")
    run = Stack(CONFIG).demo_run()
    say(f"nightly-rollup run {run}")
    after = settled()
    _report("one nightly-rollup run", before, after)
    before = after
    _many_tasks(TASKS)
    after = settled()
    grown = _report(f"one flow run with {TASKS} task runs", before, after)
    say(f"  = {grown / TASKS / 1024:.1f} KiB per task run (events and logs included)")


if __name__ == "__main__":
    main()
