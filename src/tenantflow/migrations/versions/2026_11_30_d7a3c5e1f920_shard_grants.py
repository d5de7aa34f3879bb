"""shard grants: what a sweep delegated to each of its shard runs

Revision ID: d7a3c5e1f920
Revises: c41d7e9a2b10
Create Date: 2026-11-30 13:00:00.000000+00:00

A large sweep splits its clients into shards that run as flow runs of their own, on any
worker of the pool. Whoever reaches the Prefect API can create a run of the shard flow
with any parent and any parameters, so a shard takes nothing from Prefect: the parent,
once authorized, writes one grant row per shard run, keyed by that run's id, naming the
day, the clients and the actor it acts for. The shard run reads its own grant (by its
own flow run id), refuses to run without one, and records its outcome there; the parent
reads the outcomes back. The workers' role reaches the table as `service_role` only.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "d7a3c5e1f920"
down_revision: str | Sequence[str] | None = "c41d7e9a2b10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CREATE_SHARD_GRANTS = """
CREATE TABLE tenantflow_private.shard_grants (
    child_run_id uuid NOT NULL,
    parent_run_id uuid NOT NULL,
    flow text NOT NULL,
    day date NOT NULL,
    client_ids uuid[] NOT NULL,
    actor_kind text NOT NULL,
    actor_id uuid,
    shard text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    opened_at timestamptz,
    finished_at timestamptz,
    ok_clients integer,
    events bigint,
    failed_client_ids uuid[],
    CONSTRAINT pk_shard_grants PRIMARY KEY (child_run_id),
    CONSTRAINT ck_shard_grants_actor_kind CHECK (actor_kind IN ('operator', 'scheduler')),
    CONSTRAINT ck_shard_grants_clients CHECK (cardinality(client_ids) > 0)
)
"""


def upgrade() -> None:
    """The grants table, reachable by `service_role` only (no DELETE)."""
    op.execute(CREATE_SHARD_GRANTS)
    op.execute(
        "CREATE INDEX ix_shard_grants_parent_run_id "
        "ON tenantflow_private.shard_grants (parent_run_id)"
    )
    op.execute(
        "REVOKE ALL ON TABLE tenantflow_private.shard_grants "
        "FROM PUBLIC, anon, authenticated, service_role"
    )
    op.execute(
        "GRANT SELECT, INSERT, UPDATE ON TABLE tenantflow_private.shard_grants TO service_role"
    )


def downgrade() -> None:
    """Drop the grants table."""
    op.execute("DROP TABLE tenantflow_private.shard_grants")
