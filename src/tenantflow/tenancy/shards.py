"""Shard grants: a large sweep delegates slices of its clients to shard runs.

A parent sweep the guard admitted writes one grant per child flow run
(`delegate_shard`), keyed by the child's flow run id; the child reads only that grant
(`authorize_shard`), never its parameters, records its outcome on it
(`record_shard_result`), and the parent reads that back (`read_shard_result`). Every
decision is audited like the guard's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from uuid import UUID

from sqlalchemy import text

from tenantflow.settings import Settings, get_settings
from tenantflow.tenancy.actors import _SEAL, AccessDenied, Actor, ActorKind, TenantContext
from tenantflow.tenancy.guard import audit, current_flow_run_id_or_none
from tenantflow.tenancy.sessions import guard_unit

__all__ = [
    "SHARD_GRANT_LIFETIME",
    "ShardGrant",
    "ShardResult",
    "authorize_shard",
    "delegate_shard",
    "read_shard_result",
    "record_shard_result",
]


#: How long a shard run may wait for a worker before its grant is void.
SHARD_GRANT_LIFETIME = timedelta(hours=6)


@dataclass(frozen=True)
class ShardGrant:
    """What a parent sweep delegated to one shard run: its day, its clients, its actor."""

    child_run_id: UUID
    parent_run_id: UUID
    shard: str
    day: date
    contexts: list[TenantContext]
    #: Delegated clients that are no longer active: reported, not touched.
    inactive: list[UUID]


async def delegate_shard(
    contexts: Sequence[TenantContext],
    *,
    child_run_id: UUID,
    parent_run_id: UUID,
    action: str,
    day: date,
    shard: str,
    settings: Settings | None = None,
) -> None:
    """Write the grant that lets `child_run_id` act on these clients (the parent's contexts).

    NOTE: only a parent the guard admitted holds contexts, and the grant is keyed by the
    child's flow run id: a run created through the Prefect API finds no grant of its own.
    """
    if not contexts or any(
        not isinstance(c, TenantContext) or c.seal is not _SEAL for c in contexts
    ):
        raise AccessDenied("only contexts from the tenant guard can be delegated")
    actor = contexts[0].actor
    if actor.kind is ActorKind.USER:
        raise AccessDenied("a user's work is never delegated to shards")
    async with guard_unit(settings or get_settings()) as session:
        await session.execute(
            text(
                "INSERT INTO tenantflow_private.shard_grants (child_run_id, parent_run_id, "
                "flow, day, client_ids, actor_kind, actor_id, shard, expires_at) "
                "VALUES (:child, :parent, :flow, :day, CAST(:clients AS uuid[]), :kind, "
                ":actor_id, :shard, now() + :lifetime)"
            ),
            {
                "child": child_run_id,
                "parent": parent_run_id,
                "flow": action,
                "day": day,
                "clients": [c.client_id for c in contexts],
                "kind": actor.kind.value,
                "actor_id": actor.user_id,
                "shard": shard,
                "lifetime": SHARD_GRANT_LIFETIME,
            },
        )


async def authorize_shard(
    *, action: str, flow_run_id: UUID | None = None, settings: Settings | None = None
) -> ShardGrant:
    """A shard run's authorization: the grant its parent wrote for this very flow run.

    Nothing comes from the run's parameters or its place in Prefect: the grant is found by
    the run's own id, must be for `action`, unexpired and not already finished. The
    decision is audited like every other (the reason names the parent run).

    Raises:
        AccessDenied: no grant, another flow's, expired, or already run.
    """
    settings = settings or get_settings()
    flow_run_id = flow_run_id or current_flow_run_id_or_none()
    try:
        if flow_run_id is None:
            raise AccessDenied("a shard runs only as a flow run started by its parent sweep")
        async with guard_unit(settings) as session:
            row = (
                await session.execute(
                    text(
                        "SELECT parent_run_id, flow, day, client_ids, actor_kind, actor_id, "
                        "shard, expires_at < now() AS expired, finished_at IS NOT NULL AS done "
                        "FROM tenantflow_private.shard_grants WHERE child_run_id = :id "
                        "FOR UPDATE"
                    ),
                    {"id": flow_run_id},
                )
            ).one_or_none()
            if row is None:
                raise AccessDenied(
                    "no shard grant for this flow run: shard runs are started by their parent "
                    f"sweep, which delegates their clients to them; start {action} instead"
                )
            if row.flow != action or row.expired or row.done:
                why = (
                    f"is for {row.flow}"
                    if row.flow != action
                    else "has expired"
                    if row.expired
                    else "was already used by this run"
                )
                raise AccessDenied(f"the shard grant of this flow run {why}")
            await session.execute(
                text(
                    "UPDATE tenantflow_private.shard_grants SET opened_at = now() "
                    "WHERE child_run_id = :id"
                ),
                {"id": flow_run_id},
            )
            active = {
                r[0]: r[1]
                for r in await session.execute(
                    text(
                        "SELECT id, name FROM public.clients "
                        "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'active'"
                    ),
                    {"ids": list(row.client_ids)},
                )
            }
    except AccessDenied as denied:
        await audit(
            settings,
            flow_run_id=flow_run_id,
            actor=None,
            client_ids=[None],
            action=action,
            outcome="denied",
            reason=str(denied),
        )
        raise
    actor = Actor(ActorKind(row.actor_kind), row.actor_id)
    contexts = [
        TenantContext(actor, client_id, active[client_id], flow_run_id, seal=_SEAL)
        for client_id in row.client_ids
        if client_id in active
    ]
    await audit(
        settings,
        flow_run_id=flow_run_id,
        actor=actor,
        client_ids=[c.client_id for c in contexts] or [None],
        action=action,
        outcome="allowed",
        reason=f"shard {row.shard} of flow run {row.parent_run_id}, for {actor.kind.value}",
    )
    return ShardGrant(
        child_run_id=flow_run_id,
        parent_run_id=row.parent_run_id,
        shard=row.shard,
        day=row.day,
        contexts=contexts,
        inactive=[c for c in row.client_ids if c not in active],
    )


@dataclass(frozen=True)
class ShardResult:
    finished: bool
    ok_clients: int
    events: int
    failed_client_ids: list[UUID]


async def record_shard_result(
    grant: ShardGrant,
    *,
    ok_clients: int,
    events: int,
    failed_client_ids: Sequence[UUID],
    settings: Settings | None = None,
) -> None:
    """The shard's outcome, for its parent to read back."""
    async with guard_unit(settings or get_settings()) as session:
        await session.execute(
            text(
                "UPDATE tenantflow_private.shard_grants SET finished_at = now(), "
                "ok_clients = :ok, events = :events, "
                "failed_client_ids = CAST(:failed AS uuid[]) WHERE child_run_id = :id"
            ),
            {
                "id": grant.child_run_id,
                "ok": ok_clients,
                "events": events,
                "failed": list(failed_client_ids),
            },
        )


async def read_shard_result(child_run_id: UUID, *, settings: Settings | None = None) -> ShardResult:
    """What a shard run recorded (`finished` False: it never got that far)."""
    async with guard_unit(settings or get_settings()) as session:
        row = (
            await session.execute(
                text(
                    "SELECT finished_at IS NOT NULL, coalesce(ok_clients, 0), "
                    "coalesce(events, 0), coalesce(failed_client_ids, '{}') "
                    "FROM tenantflow_private.shard_grants WHERE child_run_id = :id"
                ),
                {"id": child_run_id},
            )
        ).one_or_none()
    if row is None:
        return ShardResult(False, 0, 0, [])
    return ShardResult(bool(row[0]), int(row[1]), int(row[2]), list(row[3]))
