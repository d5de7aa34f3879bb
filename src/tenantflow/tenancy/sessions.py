"""Tenancy's two ways to a database transaction, each within the database budget.

`tenant_session(ctx)` is the only way tenant tasks reach the database: for a user it
carries the verified claims and `SET LOCAL ROLE authenticated`, so row-level security
checks the membership a second time inside Postgres; for the scheduler and operators it
runs as `service_role`. `guard_unit()` is the guard's own transaction, as `service_role`:
the workers' login role can do nothing by itself (docs/security.md).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from tenantflow.budget import one_transaction_slot, transaction_slot
from tenantflow.db import Executor, unit_of_work
from tenantflow.settings import Settings
from tenantflow.tenancy.actors import _SEAL, AccessDenied, ActorKind, TenantContext

__all__ = ["SERVICE_CLAIMS", "SERVICE_ROLE", "guard_unit", "tenant_session"]

SERVICE_ROLE: Final = "service_role"
SERVICE_CLAIMS: Final = json.dumps({"role": SERVICE_ROLE})


@asynccontextmanager
async def guard_unit(settings: Settings) -> AsyncIterator[Executor]:
    """A transaction for the guard's own reads and writes, as `service_role`, within the
    database budget (one slot while it lasts).

    NOTE: the workers' login role is NOINHERIT and owns nothing; every statement runs
    under a role switched to inside the transaction.
    """
    async with (
        one_transaction_slot(settings=settings),
        unit_of_work(
            local_settings={"request.jwt.claims": SERVICE_CLAIMS},
            role=SERVICE_ROLE,
            settings=settings,
            constant_settings=True,
        ) as session,
    ):
        yield session


@asynccontextmanager
async def tenant_session(
    ctx: TenantContext, *, settings: Settings | None = None
) -> AsyncIterator[Executor]:
    """The only way tenant tasks reach the database: one transaction under the actor's role.

    Users get `request.jwt.claims` (their verified claims) and `SET LOCAL ROLE
    authenticated`, so row-level security applies as on Supabase's Data API. The
    scheduler and operators get `service_role`; their tasks still filter by
    `ctx.client_id`.
    """
    if not isinstance(ctx, TenantContext) or ctx.seal is not _SEAL:
        raise AccessDenied("tenant_session needs a TenantContext from the tenant guard")
    claims = ctx.actor.claims
    if ctx.actor.kind is ActorKind.USER and claims is not None:
        # NOTE: Supabase's auth.uid() reads request.jwt.claim.sub before the claims
        # document (PostgREST sets both); both are set, so it sees this user either way.
        local = {
            "request.jwt.claims": claims.claims_json(),
            "request.jwt.claim.sub": str(claims.sub),
        }
        role, constant = "authenticated", False
    else:
        local, role, constant = {"request.jwt.claims": SERVICE_CLAIMS}, SERVICE_ROLE, True
    async with (
        transaction_slot(),
        unit_of_work(
            local_settings=local, role=role, settings=settings, constant_settings=constant
        ) as session,
    ):
        yield session
