"""The tenant sweep against its limit: `nightly-rollup` through its deployment and the
worker, against raw asyncpg doing the same statements at the same concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg

from bench.stackapi import (
    TimedRun,
    on_stack,
    prefect_database_bytes,
    run_deployment_timed,
    task_run_count,
)
from bench.table import Row, machine, ratio, render, say, update
from tenantflow.rollup import ROLLUP_UPSERT, day_bounds
from tenantflow.settings import Settings, get_settings
from tenantflow.tenancy import SERVICE_CLAIMS, SERVICE_ROLE
from tenantflow_dev import Stack
from tenantflow_dev.config import WORKER_DB_ROLE, StackConfig
from tenantflow_dev.demo import DEMO_OPERATOR, ROLLUP_DEPLOYMENT, sealed_token

SIZES = [int(n) for n in os.environ.get("BENCH_SWEEP_SIZES", "1000,10000").split(",") if n]
EVENTS_PER_CLIENT = 20
NAME_PREFIX = "bench-sweep-"
SAMPLE_EVERY_S = 0.02
#: The day the sweeps roll up: long before the demo's events, so only the benchmark's
#: clients have events on it.
SWEEP_DAY_AGO = timedelta(days=60)
#: Targets against raw asyncpg: the flow run's start to end at every size, and what an
#: operator waits (created to Completed) from 10,000 clients.
RUN_TARGET = 0.8
OPERATOR_TARGET = 0.6
OPERATOR_TARGET_FROM = 10_000

# The rollup's own statements, as tenant_session() sends them for a service sweep.
_SET_LOCAL = (
    "SELECT set_config('statement_timeout', $1, true), "
    "set_config('request.jwt.claims', $2, true), set_config('role', $3, true)"
)


def _positional(sql: str) -> tuple[str, list[str]]:
    """The rollup's upsert with asyncpg's `$n` placeholders, and the names in their order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return re.sub(r"(?<![:\w]):(\w+)", number, sql), names


UPSERT, UPSERT_NAMES = _positional(ROLLUP_UPSERT.text)


async def _admin(config: StackConfig) -> asyncpg.Connection:
    return await asyncpg.connect(**config.connect_parts(config.pg_port, admin=True))


async def create_clients(config: StackConfig, count: int, day: date) -> list[uuid.UUID]:
    """`count` active clients with `EVENTS_PER_CLIENT` events each on `day` (COPY)."""
    ids = [uuid.uuid4() for _ in range(count)]
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    conn = await _admin(config)
    try:
        await conn.copy_records_to_table(
            "clients",
            schema_name="public",
            columns=["id", "name"],
            records=[(i, f"{NAME_PREFIX}{n:06d}") for n, i in enumerate(ids)],
        )
        await conn.copy_records_to_table(
            "client_events",
            schema_name="public",
            columns=["client_id", "occurred_at", "kind", "amount"],
            records=[
                (client, noon - timedelta(minutes=k), "purchase", Decimal(k + 1))
                for client in ids
                for k in range(EVENTS_PER_CLIENT)
            ],
        )
        await conn.execute("ANALYZE public.clients; ANALYZE public.client_events")
    finally:
        await conn.close()
    return ids


async def remove_clients(config: StackConfig) -> int:
    """Remove every client this benchmark created (their events and metrics go with them)."""
    conn = await _admin(config)
    try:
        status = await conn.execute(
            "DELETE FROM public.clients WHERE name LIKE $1", NAME_PREFIX + "%"
        )
    finally:
        await conn.close()
    return int(status.split()[-1])


async def _active_clients(config: StackConfig) -> list[uuid.UUID]:
    conn = await _admin(config)
    try:
        rows = await conn.fetch("SELECT id FROM public.clients WHERE status = 'active'")
    finally:
        await conn.close()
    return [row["id"] for row in rows]


async def _forget_day(config: StackConfig, day: date) -> None:
    """Delete the day's metrics, so both sides insert rather than update."""
    conn = await _admin(config)
    try:
        await conn.execute("DELETE FROM public.client_daily_metrics WHERE day = $1", day)
        await conn.execute("VACUUM public.client_daily_metrics")
    finally:
        await conn.close()


@dataclass
class Peak:
    busy: int = 0
    open: int = 0
    samples: int = 0


@asynccontextmanager
async def sample_connections(config: StackConfig) -> AsyncIterator[Peak]:
    """Peak server connections of the workers' role, sampled every 20 ms."""
    peak = Peak()
    conn = await _admin(config)
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            row = await conn.fetchrow(
                "SELECT count(*) AS open, count(*) FILTER (WHERE state <> 'idle') AS busy "
                "FROM pg_stat_activity WHERE usename = $1",
                WORKER_DB_ROLE,
            )
            peak.busy = max(peak.busy, row["busy"])
            peak.open = max(peak.open, row["open"])
            peak.samples += 1
            await asyncio.sleep(SAMPLE_EVERY_S)

    sampler = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        stop.set()
        await sampler
        await conn.close()


async def limit_rate(
    config: StackConfig, settings: Settings, clients: Sequence[uuid.UUID], day: date
) -> float:
    """Clients per second of raw asyncpg: the rollup's statements, one transaction per client,
    `DB_FLOW_SLOTS` at a time, through the transaction pooler as the workers' role."""
    slots = settings.db_flow_slots
    start, end = day_bounds(day)
    connections = [
        await asyncpg.connect(
            host=config.host,
            port=config.transaction_pooler_port,
            user=WORKER_DB_ROLE,
            password=config.secrets.worker_password,
            database=config.database,
            statement_cache_size=0,
        )
        for _ in range(slots)
    ]
    queue = iter(clients)

    async def drain(conn: asyncpg.Connection) -> None:
        for client in queue:
            values = {
                "client_id": client,
                "day": day,
                "start": start,
                "end": end,
                "lock_key": f"{client}:{day.isoformat()}",
            }
            async with conn.transaction():
                await conn.execute(
                    _SET_LOCAL, str(settings.db_statement_timeout_ms), SERVICE_CLAIMS, SERVICE_ROLE
                )
                await conn.fetchrow(UPSERT, *(values[name] for name in UPSERT_NAMES))

    try:
        started = time.perf_counter()
        await asyncio.gather(*(drain(conn) for conn in connections))
        elapsed = time.perf_counter() - started
    finally:
        for conn in connections:
            await conn.close()
    return len(clients) / elapsed


async def unit_of_work_rate(
    settings: Settings, clients: Sequence[uuid.UUID], day: date, *, lanes: bool = False
) -> tuple[float, float]:
    """Clients per second, and CPU ms per client of this process, of tenantflow's own
    `unit_of_work` doing the same statements, `DB_FLOW_SLOTS` at a time, without Prefect:
    how much of the gap to the limit is the database layer rather than the orchestration.
    With `lanes`, each of them on a lane (`connection_lane`), as a sweep's batches run."""
    from tenantflow.db import connection_lane, dispose_engines, unit_of_work

    start, end = day_bounds(day)
    queue = iter(clients)

    async def drain() -> None:
        async with connection_lane(settings) if lanes else contextlib.nullcontext():
            for client in queue:
                async with unit_of_work(
                    local_settings={"request.jwt.claims": SERVICE_CLAIMS},
                    role=SERVICE_ROLE,
                    settings=settings,
                ) as session:
                    await session.execute(
                        ROLLUP_UPSERT,
                        {
                            "client_id": client,
                            "day": day,
                            "start": start,
                            "end": end,
                            "lock_key": f"{client}:{day.isoformat()}",
                        },
                    )

    try:
        cpu, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(drain() for _ in range(settings.db_flow_slots)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await dispose_engines()
    return len(clients) / elapsed, 1000 * cpu / len(clients)


@dataclass(frozen=True)
class SweepResult:
    size: int
    clients: int
    limit_rate: float
    limit_cpu_ms: float
    uow_rates: dict[str, tuple[float, float]]
    limit_peak: Peak
    run: TimedRun
    peak: Peak
    task_runs: int
    prefect_growth: int
    rolled_up: int

    @property
    def run_rate(self) -> float:
        return self.clients / self.run.run_seconds

    @property
    def operator_rate(self) -> float:
        return self.clients / self.run.created_to_completed


async def _rolled_up(config: StackConfig, day: date) -> int:
    conn = await _admin(config)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM public.client_daily_metrics WHERE day = $1", day
            )
        )
    finally:
        await conn.close()


async def _limit(
    config: StackConfig, settings: Settings, clients: Sequence[uuid.UUID], day: date
) -> tuple[float, float, Peak]:
    """One limit run on a day without metrics: clients/s, CPU ms per client, its peak."""
    await _forget_day(config, day)
    async with sample_connections(config) as peak:
        cpu = time.process_time()
        rate = await limit_rate(config, settings, clients, day)
        cpu_ms = 1000 * (time.process_time() - cpu) / len(clients)
    say(
        f"  limit (raw asyncpg, {settings.db_flow_slots} at a time): {rate:,.0f} clients/s, "
        f"{cpu_ms:.2f} CPU ms per client"
    )
    return rate, cpu_ms, peak


async def sweep(config: StackConfig, settings: Settings, size: int, day: date) -> SweepResult:
    started = time.perf_counter()
    await create_clients(config, size, day)
    clients = await _active_clients(config)
    say(
        f"  {size} clients x {EVENTS_PER_CLIENT} events created in "
        f"{time.perf_counter() - started:.1f}s ({len(clients)} active in all)"
    )
    try:
        first, first_cpu_ms, limit_peak = await _limit(config, settings, clients, day)
        uow_rates = {}
        for ping in (True, False):
            await _forget_day(config, day)
            with_ping = settings.model_copy(update={"db_pool_pre_ping": ping})
            uow_rates[f"pre-ping {'on' if ping else 'off'}"] = await unit_of_work_rate(
                with_ping, clients, day
            )
        await _forget_day(config, day)
        uow_rates["on lanes (the sweep's path)"] = await unit_of_work_rate(
            settings, clients, day, lanes=True
        )
        say(
            "  tenantflow unit_of_work, no Prefect: "
            + "; ".join(
                f"{k} {r:,.0f} clients/s, {c:.2f} CPU ms" for k, (r, c) in uow_rates.items()
            )
        )
        await _forget_day(config, day)
        before = await prefect_database_bytes(config)
        parameters = {"day": day.isoformat()}
        token = await sealed_token(
            config, DEMO_OPERATOR, flow="nightly-rollup", client_ids=None, parameters=parameters
        )
        async with sample_connections(config) as peak:
            run = await run_deployment_timed(
                ROLLUP_DEPLOYMENT, {**parameters, "access_token": token}
            )
        if not run.ok:
            raise RuntimeError(f"nightly-rollup run {run.id} ended {run.state}: {run.message}")
        batches = -(-len(clients) // settings.tenant_batch_size)
        task_runs = await task_run_count(run.id, at_least=batches)  # then the size is read
        after = await prefect_database_bytes(config)
        rolled_up = await _rolled_up(config, day)
        # NOTE: the machine is shared: the limit is measured again right after the run,
        # and the baseline is the mean of both, so a burst of load elsewhere during one
        # of them shows as the two limits' spread instead of as the sweep's ratio.
        second, second_cpu_ms, _ = await _limit(config, settings, clients, day)
        say(f"  limit of the two runs: {first:,.0f} and {second:,.0f} clients/s")
        result = SweepResult(
            size=size,
            clients=len(clients),
            limit_rate=(first + second) / 2,
            limit_cpu_ms=(first_cpu_ms + second_cpu_ms) / 2,
            uow_rates=uow_rates,
            limit_peak=limit_peak,
            run=run,
            peak=peak,
            task_runs=task_runs,
            prefect_growth=after - before,
            rolled_up=rolled_up,
        )
    finally:
        removed = await remove_clients(config)
        say(f"  removed the {removed} benchmark clients")
    say(
        f"  nightly-rollup: run {run.run_seconds:.1f}s ({result.run_rate:,.0f} clients/s), "
        f"created->Completed {run.created_to_completed:.1f}s "
        f"({result.operator_rate:,.0f} clients/s); {result.task_runs} task runs; "
        f"peak busy/open server connections {peak.busy}/{peak.open} "
        f"(limit run {limit_peak.busy}/{limit_peak.open}); Prefect database "
        f"+{result.prefect_growth / 1e6:.1f} MB; {result.rolled_up} rows rolled up"
    )
    return result


def sweep_rows(results: list[SweepResult], settings: Settings) -> list[Row]:
    rows: list[Row] = []
    for r in results:
        n = f"{r.clients:,} clients"
        rows.append(
            Row(
                f"nightly-rollup {n}, flow run start->end (clients/s)",
                f"{r.run_rate:,.0f}",
                f"{r.limit_rate:,.0f} (raw asyncpg, mean of 2 runs)",
                ratio(r.run_rate, r.limit_rate),
                f">= {RUN_TARGET}x",
                r.run_rate >= RUN_TARGET * r.limit_rate,
            )
        )
        # NOTE: what an operator waits includes the flow run's start (a process, imports),
        # seconds whatever the size: the target is set where the sweep dominates.
        operator_target = r.size >= OPERATOR_TARGET_FROM
        rows.append(
            Row(
                f"nightly-rollup {n}, created->Completed (clients/s)",
                f"{r.operator_rate:,.0f} ({r.run.created_to_completed:.1f} s)",
                f"{r.limit_rate:,.0f} (raw asyncpg, mean of 2 runs)",
                ratio(r.operator_rate, r.limit_rate),
                f">= {OPERATOR_TARGET}x" if operator_target else "-",
                r.operator_rate >= OPERATOR_TARGET * r.limit_rate if operator_target else None,
            )
        )
        for label, (rate, cpu) in r.uow_rates.items():
            rows.append(
                Row(
                    f"unit_of_work without Prefect, {label}, {n} (clients/s; CPU ms/client)",
                    f"{rate:,.0f}; {cpu:.2f}",
                    f"{r.limit_rate:,.0f}; {r.limit_cpu_ms:.2f} (raw asyncpg)",
                    ratio(rate, r.limit_rate),
                )
            )
        bound = r.clients / 100 + 10
        rows.append(
            Row(
                f"task runs of the sweep, {n}",
                f"{r.task_runs}",
                f"{bound:,.0f} (clients/100 + 10)",
                ratio(r.task_runs, bound),
                "<= 1.00x",
                r.task_runs <= bound,
            )
        )
        budget = settings.db_concurrency_slots
        rows.append(
            Row(
                f"peak busy server connections (open), {n}",
                f"{r.peak.busy} ({r.peak.open} open; limit run {r.limit_peak.busy})",
                f"{budget} (DB_CONCURRENCY_SLOTS)",
                ratio(r.peak.busy, budget),
                "<= 1.00x",
                r.peak.busy <= budget,
            )
        )
        rows.append(
            Row(
                f"Prefect database growth per sweep, {n}",
                f"{r.prefect_growth / 1e6:.2f} MB",
                f"{r.prefect_growth / r.clients * 1000 / 1e3:.1f} kB per 1,000 clients",
                "-",
            )
        )
    if len(results) >= 2:
        small, large = results[0], results[-1]
        per_small = small.run.run_seconds / small.clients * 1000
        per_large = large.run.run_seconds / large.clients * 1000
        rows.append(
            Row(
                f"growth: s per 1,000 clients at {large.clients:,} (flow run)",
                f"{per_large:.2f} s",
                f"{per_small:.2f} s at {small.clients:,}",
                ratio(per_large, per_small),
                "<= 1.2x (linear)",
                per_large <= 1.2 * per_small,
            )
        )
        lim_small = 1000 / small.limit_rate
        lim_large = 1000 / large.limit_rate
        rows.append(
            Row(
                f"growth: s per 1,000 clients at {large.clients:,} (limit)",
                f"{lim_large:.2f} s",
                f"{lim_small:.2f} s at {small.clients:,}",
                ratio(lim_large, lim_small),
            )
        )
    return rows


async def sweeps(stack: Stack) -> list[Row]:
    """The sweep at every size of `BENCH_SWEEP_SIZES`, each against its own limit run."""
    settings = get_settings()
    day = datetime.now(UTC).date() - SWEEP_DAY_AGO
    say(
        f"\n## nightly-rollup through its deployment and the worker, against raw asyncpg "
        f"(day {day}, DB_FLOW_SLOTS={settings.db_flow_slots}, "
        f"TENANT_BATCH_SIZE={settings.tenant_batch_size})"
    )
    await remove_clients(stack.config)  # leftovers of an interrupted run
    results: list[SweepResult] = []
    for size in SIZES:
        say(f"- {size:,} extra clients")
        results.append(await sweep(stack.config, settings, size, day))
    return sweep_rows(results, settings)


def main() -> None:
    """`python -m bench.sweep`: the sweep's rows alone, into `bench/results.md`."""
    rows = on_stack(sweeps)
    say("\n" + render(rows))
    update(rows, f"the sweep's rows measured alone ({machine()})")


if __name__ == "__main__":
    main()
