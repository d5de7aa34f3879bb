"""`nightly-rollup`: every active client's events of one day into `client_daily_metrics`.

Service mode: a run created by the project's own schedule (as `prefect.yaml` declares
it) needs no token; any other run needs an operator's sealed access token. Steps:
authorize; then either roll the clients up here, in batches, within this run's database
slots, or, for more than `TENANT_SHARD_SIZE` clients, in shard runs through the work
pool (holding no slots while they run); publish the tables, and fail naming the clients
that failed (the others are kept).
"""

from __future__ import annotations

from datetime import date
from uuid import UUID

from prefect import get_run_logger

from tenantflow.budget import database_slots
from tenantflow.rollup import (
    RollupOutcome,
    default_day,
    publish_rollup,
    publish_shards,
    raise_if_any_failed,
    roll_up_clients,
)
from tenantflow.settings import get_settings
from tenantflow.shards import run_in_shards
from tenantflow.tenancy import (
    OptionalSealedAccessToken,
    authorize_run,
    current_flow_run_id,
    tenant_flow,
)


@tenant_flow(name="nightly-rollup", timeout_seconds=3600)
async def nightly_rollup(
    day: date | None = None,
    client_ids: list[UUID] | None = None,
    access_token: OptionalSealedAccessToken = None,
) -> dict[str, int]:
    """Roll each active client's events of one UTC day up into `client_daily_metrics`.

    Args:
        day: The day to roll up (UTC). Empty: the day before the scheduled slot
            (yesterday, for a run started by hand).
        client_ids: Only these clients. Empty: every active client.
        access_token: Needed only when started by hand: a tenantflow operator's sealed
            access token for exactly this run (`tenantflow seal --flow nightly-rollup`,
            with the same `--client` ids, or none for every client, and `--param
            day=...` if a day is given). Scheduled runs need none.
    """
    logger = get_run_logger()
    settings = get_settings()
    contexts = await authorize_run(
        action="nightly-rollup",
        mode="service",
        access_token=access_token,
        client_ids=client_ids,
    )
    day = day or default_day(contexts)
    outcomes: list[RollupOutcome]
    if len(contexts) > settings.tenant_shard_size:
        logger.info(
            "rolling up %d client(s) for %s in shards of %d",
            len(contexts),
            day,
            settings.tenant_shard_size,
        )
        shards = await run_in_shards(contexts, day, parent_run_id=current_flow_run_id())
        failed = await publish_shards(day, shards)
        raise_if_any_failed(failed, total=len(contexts))
        return {"clients": len(contexts), "events": sum(s.events for s in shards)}
    async with database_slots(settings.db_flow_slots) as slots:
        logger.info("rolling up %d client(s) for %s, %d at a time", len(contexts), day, slots)
        outcomes = await roll_up_clients(contexts, day)
    await publish_rollup(day, outcomes)
    raise_if_any_failed(outcomes)
    return {"clients": len(outcomes), "events": sum(o.events or 0 for o in outcomes)}
