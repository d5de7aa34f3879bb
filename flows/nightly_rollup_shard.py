"""`nightly-rollup-shard`: one shard of a large `nightly-rollup` sweep.

Started only by a `nightly-rollup` run, which delegates a slice of its clients to it: the
shard reads its day and clients from the grant its parent wrote for this very flow run
(`tenantflow.tenancy.authorize_shard`), never from parameters, and refuses to run
without one. Steps: authorize, roll up within this run's database slots, publish the
table, record the outcome for the parent, fail naming the clients that failed.
"""

from __future__ import annotations

from uuid import UUID

from prefect import flow

from tenantflow.budget import database_slots
from tenantflow.rollup import (
    RollupOutcome,
    publish_rollup,
    raise_if_any_failed,
    roll_up_clients,
)
from tenantflow.settings import get_settings
from tenantflow.tenancy import authorize_shard, record_shard_result


@flow(name="nightly-rollup-shard", retries=0, persist_result=False, timeout_seconds=3600)
async def nightly_rollup_shard() -> dict[str, int]:
    """One shard of a nightly-rollup sweep. Started by its parent run only: it takes no
    parameters, and a run started any other way is refused."""
    grant = await authorize_shard(action="nightly-rollup")
    async with database_slots(get_settings().db_flow_slots):
        outcomes = await roll_up_clients(grant.contexts, grant.day)
    outcomes += [
        RollupOutcome(str(client), "-", False, error="no longer an active client")
        for client in grant.inactive
    ]
    await publish_rollup(grant.day, outcomes)
    ok = [o for o in outcomes if o.ok]
    await record_shard_result(
        grant,
        ok_clients=len(ok),
        events=sum(o.events or 0 for o in ok),
        failed_client_ids=[UUID(o.client_id) for o in outcomes if not o.ok],
    )
    raise_if_any_failed(outcomes)
    return {"clients": len(outcomes), "events": sum(o.events or 0 for o in ok)}
