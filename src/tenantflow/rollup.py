"""The nightly rollup: each active client's events of one day into `client_daily_metrics`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import partial

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from sqlalchemy import text

from tenantflow.batches import ClientOutcome, run_for_clients
from tenantflow.errors import TenantflowError
from tenantflow.shards import ShardOutcome
from tenantflow.tenancy import TenantContext, tenant_session

__all__ = [
    "ROLLUP_UPSERT",
    "ClientRollup",
    "RollupFailed",
    "RollupOutcome",
    "day_bounds",
    "default_day",
    "failed_clients_markdown",
    "publish_rollup",
    "publish_shards",
    "raise_if_any_failed",
    "roll_up_clients",
    "rollup_client",
    "yesterday_utc",
]

#: The rollup of one client and day (the benchmark replays it with raw asyncpg).
# NOTE: one statement, so a rerun replaces the day's row (idempotent) and a failure
# leaves the previous row in place; the per-(client, day) transaction lock makes two
# overlapping rollups of the same day take turns instead of racing.
ROLLUP_UPSERT = text(
    """
    WITH lock AS (
        SELECT pg_advisory_xact_lock(hashtext('tenantflow.rollup'), hashtext(:lock_key))
    )
    INSERT INTO public.client_daily_metrics (client_id, day, events, revenue, computed_at)
    SELECT CAST(:client_id AS uuid), CAST(:day AS date),
           count(e.id), coalesce(sum(e.amount), 0), now()
    FROM lock
    LEFT JOIN public.client_events AS e
      ON e.client_id = CAST(:client_id AS uuid) AND e.occurred_at >= :start AND e.occurred_at < :end
    ON CONFLICT (client_id, day) DO UPDATE
      SET events = EXCLUDED.events, revenue = EXCLUDED.revenue, computed_at = EXCLUDED.computed_at
    RETURNING events, revenue
    """
)


@dataclass(frozen=True)
class ClientRollup:
    client_id: str
    client_name: str
    events: int
    revenue: Decimal
    seconds: float


def yesterday_utc() -> date:
    return datetime.now(UTC).date() - timedelta(days=1)


def default_day(contexts: Sequence[TenantContext]) -> date:
    """The day a rollup without a `day` rolls up: the UTC day before the slot its schedule
    fired for (a run late past midnight still does its own night), or yesterday for a run
    started by hand."""
    slot = contexts[0].actor.slot if contexts else None
    if slot is None:
        return yesterday_utc()
    return slot.astimezone(UTC).date() - timedelta(days=1)


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC day."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


async def rollup_client(ctx: TenantContext, day: date) -> ClientRollup:
    """Upsert one client's metrics of `day` (UTC) from its events, in one transaction."""
    started = time.perf_counter()
    start, end = day_bounds(day)
    async with tenant_session(ctx) as session:
        events, revenue = (
            await session.execute(
                ROLLUP_UPSERT,
                {
                    "client_id": ctx.client_id,
                    "day": day,
                    "start": start,
                    "end": end,
                    "lock_key": f"{ctx.client_id}:{day.isoformat()}",
                },
            )
        ).one()
    return ClientRollup(
        str(ctx.client_id), ctx.client_name, events, revenue, time.perf_counter() - started
    )


@dataclass(frozen=True)
class RollupOutcome:
    client_id: str
    client_name: str
    ok: bool
    events: int | None = None
    revenue: Decimal | None = None
    seconds: float | None = None
    error: str | None = None

    def row(self) -> dict[str, str | int | float | None]:
        return {
            "client": f"{self.client_name} ({self.client_id})",
            "events": self.events,
            "revenue": None if self.revenue is None else f"{self.revenue:.2f}",
            "duration_s": None if self.seconds is None else round(self.seconds, 3),
            "outcome": "ok" if self.ok else f"failed: {self.error}",
        }

    @classmethod
    def of(cls, outcome: ClientOutcome[ClientRollup]) -> RollupOutcome:
        client_id, name = str(outcome.client_id), outcome.client_name
        if outcome.value is None:
            return cls(client_id, name, False, seconds=outcome.seconds, error=outcome.error)
        rolled = outcome.value
        return cls(client_id, name, True, rolled.events, rolled.revenue, outcome.seconds)


class RollupFailed(TenantflowError, RuntimeError):
    """Some clients could not be rolled up; the others were."""


async def roll_up_clients(contexts: Sequence[TenantContext], day: date) -> list[RollupOutcome]:
    """Roll every client up, in batches of task runs; a progress artifact follows along.

    One client failing does not stop the others (`tenantflow.batches`).
    """
    total = len(contexts)
    progress = await acreate_progress_artifact(
        0.0,
        key="nightly-rollup-progress",
        description=f"Rolling up {total} client(s) for {day}",
    )
    done = 0

    async def advance(outcomes: Sequence[ClientOutcome[ClientRollup]]) -> None:
        nonlocal done
        done += len(outcomes)
        await aupdate_progress_artifact(progress, 100.0 * done / max(total, 1))

    outcomes = await run_for_clients(
        contexts, partial(rollup_client, day=day), name="rollup", on_batch_done=advance
    )
    return [RollupOutcome.of(outcome) for outcome in outcomes]


async def publish_rollup(day: date, outcomes: Sequence[RollupOutcome]) -> None:
    """The end-of-run artifacts: a table (client, events, revenue, duration, outcome), and
    for failures, the failed client ids ready to paste into a new run's `client_ids`."""
    failed = [o for o in outcomes if not o.ok]
    await acreate_table_artifact(
        [o.row() for o in outcomes],
        key="nightly-rollup",
        description=(
            f"Nightly rollup of {day}: {len(outcomes) - len(failed)} ok, {len(failed)} failed"
        ),
    )
    if failed:
        await acreate_markdown_artifact(
            failed_clients_markdown(day, failed),
            key="nightly-rollup-failed-clients",
            description=f"{len(failed)} client(s) of {day} to roll up again",
        )


async def publish_shards(day: date, shards: Sequence[ShardOutcome]) -> list[RollupOutcome]:
    """A sharded sweep's artifacts: a table with a row per shard (each shard run has the
    per-client table), and the failed client ids; returns the failed clients' outcomes."""
    failed = [
        RollupOutcome(
            str(ctx.client_id),
            ctx.client_name,
            False,
            error=f"failed in shard {shard.label} (runs: {', '.join(map(str, shard.runs))})",
        )
        for shard in shards
        for ctx in shard.failed
    ]
    clients = sum(shard.clients for shard in shards)
    await acreate_table_artifact(
        [shard.row() for shard in shards],
        key="nightly-rollup",
        description=(
            f"Nightly rollup of {day} in {len(shards)} shards: {clients - len(failed)} ok, "
            f"{len(failed)} failed; each shard run's own table has a row per client"
        ),
    )
    if failed:
        await acreate_markdown_artifact(
            failed_clients_markdown(day, failed),
            key="nightly-rollup-failed-clients",
            description=f"{len(failed)} client(s) of {day} to roll up again",
        )
    return failed


def failed_clients_markdown(day: date, failed: Sequence[RollupOutcome]) -> str:
    """The failed client ids as the `client_ids` parameter of a new run takes them."""
    ids = json.dumps([o.client_id for o in failed])
    return (
        f"# {len(failed)} client(s) failed on {day}\n\n"
        "To roll up only these again, start `nightly-rollup` with `day` "
        f"`{day}` and this `client_ids` (paste it into the form's JSON view):\n\n"
        f"```json\n{ids}\n```\n"
    )


def raise_if_any_failed(outcomes: Sequence[RollupOutcome], *, total: int | None = None) -> None:
    """Fail the run naming the failed clients (the first 20); `total` when `outcomes` holds
    the failures only (a sharded sweep)."""
    failed = [o for o in outcomes if not o.ok]
    if failed:
        names = ", ".join(f"{o.client_name} ({o.client_id})" for o in failed[:20])
        more = f" and {len(failed) - 20} more" if len(failed) > 20 else ""
        of = len(outcomes) if total is None else total
        raise RollupFailed(f"{len(failed)} of {of} client(s) failed: {names}{more}")
