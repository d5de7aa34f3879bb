"""The database schema as SQLAlchemy Core tables.

The Alembic migrations in `tenantflow.migrations` own the schema; these tables
describe it for query code and for `alembic revision --autogenerate` (which compares
them with a migrated database, so they must stay in step with the migrations; a test
checks that). Nothing here ever creates a table: no `create_all`.

Constraint and index names come from `NAMING_CONVENTION`, so the names a migration
writes are the names autogenerate expects.

Row-level security, policies, grants and the membership helper live in SQL inside
the migrations; `MEMBER_ROLES` and `CLIENT_STATUSES` mirror their CHECK constraints.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TIMESTAMP

__all__ = [
    "AUTH_SCHEMA",
    "CLIENT_STATUSES",
    "MEMBER_ROLES",
    "NAMING_CONVENTION",
    "PRIVATE_SCHEMA",
    "TENANT_TABLES",
    "audit_log",
    "auth_users",
    "client_daily_metrics",
    "client_events",
    "client_reports",
    "clients",
    "include_object",
    "memberships",
    "metadata",
]

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Supabase's schema (never created or changed by tenantflow).
AUTH_SCHEMA: Final = "auth"
#: Helpers that policies call; not exposed through Supabase's Data API.
PRIVATE_SCHEMA: Final = "tenantflow_private"

#: Membership roles, lowest first: a "min_role" check accepts that role and any above it.
MEMBER_ROLES: Final = ("viewer", "member", "admin", "owner")
CLIENT_STATUSES: Final = ("active", "suspended", "deleted")
ACTOR_KINDS: Final = ("user", "operator", "scheduler")
OUTCOMES: Final = ("allowed", "denied")

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _timestamptz() -> TIMESTAMP:
    return TIMESTAMP(timezone=True)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# NOTE: Supabase's table, declared only so foreign keys resolve. `info["external"]`
# keeps autogenerate from ever proposing to create or drop it.
auth_users = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True),
    schema=AUTH_SCHEMA,
    info={"external": True},
)

clients = Table(
    "clients",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("name", Text, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'active'")),
    Column("created_at", _timestamptz(), nullable=False, server_default=text("now()")),
    CheckConstraint(_one_of("status", CLIENT_STATUSES), name="status"),
)

memberships = Table(
    "memberships",
    metadata,
    Column(
        "user_id",
        Uuid,
        ForeignKey(auth_users.c.id, ondelete="CASCADE"),
        nullable=False,
    ),
    Column("client_id", Uuid, ForeignKey(clients.c.id, ondelete="CASCADE"), nullable=False),
    Column("role", Text, nullable=False),
    Column("invited_at", _timestamptz(), nullable=False, server_default=text("now()")),
    Column("accepted_at", _timestamptz(), nullable=True),
    # NOTE: the primary key is the unique (user_id, client_id) pair; its index leads with
    # user_id, so it is the `memberships(user_id)` index the policies' lookup needs.
    PrimaryKeyConstraint("user_id", "client_id"),
    CheckConstraint(_one_of("role", MEMBER_ROLES), name="role"),
    Index(None, "client_id"),
)

client_events = Table(
    "client_events",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("client_id", Uuid, ForeignKey(clients.c.id, ondelete="CASCADE"), nullable=False),
    Column("occurred_at", _timestamptz(), nullable=False),
    Column("kind", Text, nullable=False),
    Column("amount", Numeric(14, 2), nullable=True),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Index(None, "client_id", "occurred_at"),
)

client_daily_metrics = Table(
    "client_daily_metrics",
    metadata,
    Column("client_id", Uuid, ForeignKey(clients.c.id, ondelete="CASCADE"), nullable=False),
    Column("day", Date, nullable=False),
    Column("events", Integer, nullable=False, server_default=text("0")),
    Column("revenue", Numeric(14, 2), nullable=False, server_default=text("0")),
    Column("computed_at", _timestamptz(), nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("client_id", "day"),
    CheckConstraint("events >= 0", name="events_not_negative"),
)

client_reports = Table(
    "client_reports",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("client_id", Uuid, ForeignKey(clients.c.id, ondelete="CASCADE"), nullable=False),
    Column(
        "requested_by",
        Uuid,
        ForeignKey(auth_users.c.id, ondelete="SET NULL"),
        nullable=True,
    ),
    Column("period_start", Date, nullable=False),
    Column("period_end", Date, nullable=False),
    Column("totals", JSONB, nullable=False),
    Column("created_at", _timestamptz(), nullable=False, server_default=text("now()")),
    Column("flow_run_id", Uuid, nullable=True),
    CheckConstraint("period_end >= period_start", name="period"),
    Index(None, "client_id", "created_at"),
)

# NOTE: no foreign keys: an audit entry outlives the client and the user it names, and
# a denied request may name a client that does not exist. Append-only (a trigger).
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("at", _timestamptz(), nullable=False, server_default=text("now()")),
    Column("flow_run_id", Uuid, nullable=True),
    Column("actor_kind", Text, nullable=False),
    Column("actor_id", Uuid, nullable=True),
    Column("client_id", Uuid, nullable=True),
    Column("action", Text, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("reason", Text, nullable=True),
    CheckConstraint(_one_of("actor_kind", ACTOR_KINDS), name="actor_kind"),
    CheckConstraint(_one_of("outcome", OUTCOMES), name="outcome"),
    Index(None, "client_id", "at"),
)

#: Tables holding client data: row-level security is enabled on each of them.
TENANT_TABLES: Final = (
    clients,
    memberships,
    client_events,
    client_daily_metrics,
    client_reports,
    audit_log,
)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's autogenerate filter: leave Supabase's own tables (`auth.users`) alone."""
    return not (type_ == "table" and getattr(obj, "info", {}).get("external"))
