"""create tenant tables

Revision ID: a9a2422d43c3
Revises: base
Create Date: 2026-11-25 13:46:51.623416+00:00

The tables of the schema, with every constraint and index named explicitly (the
names `tenantflow.schema.NAMING_CONVENTION` gives), so this revision stays the same
whatever later happens to the naming convention. Row-level security and grants come
in the next revision; Supabase's `auth` schema and roles are never created here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "a9a2422d43c3"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    """Create clients, memberships, client_events, metrics, reports and audit_log."""
    op.create_table(
        "clients",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'active'"), nullable=False),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status IN ('active', 'suspended', 'deleted')", name=op.f("ck_clients_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clients")),
    )
    op.create_table(
        "memberships",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("client_id", sa.Uuid(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("invited_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("accepted_at", TIMESTAMPTZ, nullable=True),
        sa.CheckConstraint(
            "role IN ('viewer', 'member', 'admin', 'owner')", name=op.f("ck_memberships_role")
        ),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_memberships_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["auth.users.id"],
            name=op.f("fk_memberships_user_id_users"),
            ondelete="CASCADE",
        ),
        # NOTE: the unique (user_id, client_id) pair is the primary key; its index leads
        # with user_id, so it serves the policies' `WHERE user_id = auth.uid()` lookup.
        sa.PrimaryKeyConstraint("user_id", "client_id", name=op.f("pk_memberships")),
    )
    op.create_index(op.f("ix_memberships_client_id"), "memberships", ["client_id"])
    op.create_table(
        "client_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("client_id", sa.Uuid(), nullable=False),
        sa.Column("occurred_at", TIMESTAMPTZ, nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("amount", sa.Numeric(14, 2), nullable=True),
        sa.Column(
            "payload",
            postgresql.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_client_events_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_client_events")),
    )
    op.create_index(
        op.f("ix_client_events_client_id_occurred_at"),
        "client_events",
        ["client_id", "occurred_at"],
    )
    op.create_table(
        "client_daily_metrics",
        sa.Column("client_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("events", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("revenue", sa.Numeric(14, 2), server_default=sa.text("0"), nullable=False),
        sa.Column("computed_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("events >= 0", name=op.f("ck_client_daily_metrics_events_not_negative")),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_client_daily_metrics_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("client_id", "day", name=op.f("pk_client_daily_metrics")),
    )
    op.create_table(
        "client_reports",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("client_id", sa.Uuid(), nullable=False),
        sa.Column("requested_by", sa.Uuid(), nullable=True),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("period_end", sa.Date(), nullable=False),
        sa.Column("totals", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("flow_run_id", sa.Uuid(), nullable=True),
        sa.CheckConstraint("period_end >= period_start", name=op.f("ck_client_reports_period")),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_client_reports_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["requested_by"],
            ["auth.users.id"],
            name=op.f("fk_client_reports_requested_by_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_client_reports")),
    )
    op.create_index(
        op.f("ix_client_reports_client_id_created_at"),
        "client_reports",
        ["client_id", "created_at"],
    )
    # NOTE: no foreign keys: an audit entry outlives the client and user it names, and a
    # denied request may name a client that does not exist.
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("flow_run_id", sa.Uuid(), nullable=True),
        sa.Column("actor_kind", sa.Text(), nullable=False),
        sa.Column("actor_id", sa.Uuid(), nullable=True),
        sa.Column("client_id", sa.Uuid(), nullable=True),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "actor_kind IN ('user', 'operator', 'scheduler')",
            name=op.f("ck_audit_log_actor_kind"),
        ),
        sa.CheckConstraint("outcome IN ('allowed', 'denied')", name=op.f("ck_audit_log_outcome")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_client_id_at"), "audit_log", ["client_id", "at"])


def downgrade() -> None:
    """Drop the tables (and their data) in reverse order."""
    op.drop_index(op.f("ix_audit_log_client_id_at"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index(op.f("ix_client_reports_client_id_created_at"), table_name="client_reports")
    op.drop_table("client_reports")
    op.drop_table("client_daily_metrics")
    op.drop_index(op.f("ix_client_events_client_id_occurred_at"), table_name="client_events")
    op.drop_table("client_events")
    op.drop_index(op.f("ix_memberships_client_id"), table_name="memberships")
    op.drop_table("memberships")
    op.drop_table("clients")
