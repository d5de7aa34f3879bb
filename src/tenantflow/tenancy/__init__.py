"""Tenancy: who may touch which client's data, settled once per run.

A flow that touches client data is declared with `tenant_flow` and calls
`authorize_run()` first. It opens the run's sealed access token, settles the run's
**actor**, checks it against the flow's mode and the clients asked for, writes every
decision to `audit_log`, and hands back one `TenantContext` per client. Tenant work
(`tenantflow.batches`) takes those contexts; `tenant_session(ctx)`, which refuses
anything else, is its only way to a database session: for a user it carries the verified
claims and `SET LOCAL ROLE authenticated`, so row-level security checks the membership a
second time inside Postgres; for the scheduler and operators it runs as `service_role`.
The guard's own reads and writes run as `service_role` too: the workers' login role can
do nothing by itself (docs/security.md).

One concern per module:

- `actors`: actors, `AccessDenied`, and the `TenantContext` only the guard issues;
- `guard`: the decision (`authorize_run`, `authorize_token`) and its audit trail;
- `run_token`: the run's `access_token` parameter: its type, opening the seal,
  redacting a plain token and the hooks that do so;
- `shards`: the grants a sweep delegates to its shard runs;
- `sessions`: the guard's own transactions and tenant sessions;
- `flow`: `tenant_flow`, Prefect's `@flow` for flows that take an `access_token`.
"""

from __future__ import annotations

from tenantflow.tenancy.actors import AccessDenied, Actor, ActorKind, TenantContext
from tenantflow.tenancy.flow import tenant_flow
from tenantflow.tenancy.guard import (
    AUTH_ATTEMPTS,
    Mode,
    authorize_run,
    authorize_token,
    current_flow_run_id,
    require_membership,
)
from tenantflow.tenancy.run_token import (
    REDACTED,
    OptionalSealedAccessToken,
    SealedAccessToken,
    redact_token_on_failure,
)
from tenantflow.tenancy.sessions import SERVICE_CLAIMS, SERVICE_ROLE, tenant_session
from tenantflow.tenancy.shards import (
    SHARD_GRANT_LIFETIME,
    ShardGrant,
    ShardResult,
    authorize_shard,
    delegate_shard,
    read_shard_result,
    record_shard_result,
)

__all__ = [
    "AUTH_ATTEMPTS",
    "REDACTED",
    "SERVICE_CLAIMS",
    "SERVICE_ROLE",
    "SHARD_GRANT_LIFETIME",
    "AccessDenied",
    "Actor",
    "ActorKind",
    "Mode",
    "OptionalSealedAccessToken",
    "SealedAccessToken",
    "ShardGrant",
    "ShardResult",
    "TenantContext",
    "authorize_run",
    "authorize_shard",
    "authorize_token",
    "current_flow_run_id",
    "delegate_shard",
    "read_shard_result",
    "record_shard_result",
    "redact_token_on_failure",
    "require_membership",
    "tenant_flow",
    "tenant_session",
]
