"""`nightly-rollup`: every active client's events of one day into `client_daily_metrics`.

Service mode (DESIGN.md §2): a run created by the deployment's schedule needs no token;
a run started by hand needs an operator's access token. Steps: take database slots,
authorize, roll up each client on this event loop within the slots, publish the table,
and fail naming the clients that failed (the others are kept).
"""

from __future__ import annotations

from datetime import date
from uuid import UUID

from prefect import flow, get_run_logger
from pydantic import SecretStr

from tenantflow.budget import database_slots
from tenantflow.rollup import publish_rollup, raise_if_any_failed, roll_up_clients, yesterday_utc
from tenantflow.settings import get_settings
from tenantflow.tenancy import (
    authorize_run,
    redact_stored_access_token,
    redact_token_on_failure,
)


@flow(
    name="nightly-rollup",
    retries=0,
    persist_result=False,
    on_failure=[redact_token_on_failure],
    on_crashed=[redact_token_on_failure],
    timeout_seconds=3600,
)
async def nightly_rollup(
    day: date | None = None,
    client_ids: list[UUID] | None = None,
    access_token: SecretStr | None = None,
) -> dict[str, int]:
    """Roll each active client's events of one UTC day up into `client_daily_metrics`.

    Args:
        day: The day to roll up (UTC). Empty: yesterday.
        client_ids: Only these clients. Empty: every active client.
        access_token: Needed only when started by hand: the Supabase access token of a
            tenantflow operator. Scheduled runs need none. Removed from the run's stored
            parameters once read.
    """
    logger = get_run_logger()
    await redact_stored_access_token()  # first: Prefect stores parameters in clear
    day = day or yesterday_utc()
    async with database_slots(get_settings().db_flow_slots) as slots:
        contexts = await authorize_run(
            action="nightly-rollup",
            mode="service",
            access_token=access_token,
            client_ids=client_ids,
        )
        logger.info("rolling up %d client(s) for %s, %d at a time", len(contexts), day, slots)
        outcomes = await roll_up_clients(contexts, day)
    await publish_rollup(day, outcomes)
    raise_if_any_failed(outcomes)
    return {"clients": len(outcomes), "events": sum(o.events or 0 for o in outcomes)}
