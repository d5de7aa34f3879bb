"""row level security, grants and the append-only audit log

Revision ID: bee7517585ab
Revises: a9a2422d43c3
Create Date: 2026-11-25 13:46:53.263964+00:00

Who may see what:

* `authenticated` (a user's token, set by the worker with `SET LOCAL ROLE` and
  `request.jwt.claims`; also what Supabase's Data API runs a signed-in user's requests
  as) sees only rows of clients where the user holds an *accepted* membership and the
  client is *active*; it reads its own membership rows; it may store a report for such
  a client in its own name. Nothing else: no UPDATE/DELETE anywhere, no audit_log.
* `anon` gets nothing.
* `service_role` keeps full access to tenant data (it has BYPASSRLS), but, like every
  worker role, only SELECT and INSERT on `audit_log`.
* `postgres` owns the tables (and so bypasses grants): a statement trigger refuses
  UPDATE, DELETE and TRUNCATE on `audit_log` for every role.

NOTE: Supabase grants ALL on every new table in `public` to anon, authenticated and
service_role through default privileges, so this revision first revokes everything and
then grants only what the flows need. Each `op.execute` holds one statement (asyncpg
prepares each statement; several in one string are refused).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "bee7517585ab"
down_revision: str | Sequence[str] | None = "a9a2422d43c3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PRIVATE = "tenantflow_private"
TABLES = (
    "clients",
    "memberships",
    "client_events",
    "client_daily_metrics",
    "client_reports",
    "audit_log",
)
# NOTE: FORCE also subjects the table owner to RLS unless it has BYPASSRLS (Supabase's and
# the local stack's `postgres` has it, so today it changes nothing). Not on clients and
# memberships: the SECURITY DEFINER helper reads those as their owner, and under FORCE an
# owner without BYPASSRLS would see no rows there and every policy would deny.
FORCED = ("client_events", "client_daily_metrics", "client_reports", "audit_log")

# The membership helper. SECURITY DEFINER so it can read memberships/clients whatever the
# caller's grants; `search_path = ''` so every name in it is schema-qualified and a caller
# cannot shadow them. It lives in a schema Supabase's Data API does not expose.
#
# NOTE: the policies call it as `client_id IN (SELECT tenantflow_private.member_client_ids())`.
# The sub-select does not depend on the row, so PostgreSQL runs it once per statement
# (an InitPlan/hashed SubPlan) and then filters rows against the set. The tempting
# `(SELECT is_member(client_id))` does depend on the row: it becomes a correlated subplan
# run once per row, with a SECURITY DEFINER call (no inlining) each time.
MEMBER_CLIENT_IDS = """
CREATE FUNCTION tenantflow_private.member_client_ids(min_role text DEFAULT NULL)
RETURNS SETOF uuid
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
ROWS 10
AS $$
    SELECT m.client_id
    FROM public.memberships AS m
    JOIN public.clients AS c ON c.id = m.client_id
    WHERE m.user_id = (SELECT auth.uid())
      AND m.accepted_at IS NOT NULL
      AND c.status = 'active'
      -- an unknown min_role matches nothing: fail closed
      AND array_position(ARRAY['viewer', 'member', 'admin', 'owner'], m.role)
          >= CASE WHEN min_role IS NULL THEN 1
                  ELSE array_position(ARRAY['viewer', 'member', 'admin', 'owner'], min_role)
             END
$$
"""

IS_MEMBER = """
CREATE FUNCTION tenantflow_private.is_member(client_id uuid, min_role text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT EXISTS (
        SELECT FROM tenantflow_private.member_client_ids(min_role) AS ids (id)
        WHERE ids.id = is_member.client_id
    )
$$
"""

APPEND_ONLY = """
CREATE FUNCTION tenantflow_private.refuse_audit_log_change()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""

MEMBER_OF_ACTIVE_CLIENT = f"client_id IN (SELECT {PRIVATE}.member_client_ids())"

POLICIES: tuple[tuple[str, str, str, str], ...] = (
    # (table, policy, command, USING / WITH CHECK)
    ("clients", "clients_select_member", "SELECT", f"id IN (SELECT {PRIVATE}.member_client_ids())"),
    ("memberships", "memberships_select_own", "SELECT", "user_id = (SELECT auth.uid())"),
    ("client_events", "client_events_select_member", "SELECT", MEMBER_OF_ACTIVE_CLIENT),
    (
        "client_daily_metrics",
        "client_daily_metrics_select_member",
        "SELECT",
        MEMBER_OF_ACTIVE_CLIENT,
    ),
    ("client_reports", "client_reports_select_member", "SELECT", MEMBER_OF_ACTIVE_CLIENT),
    (
        "client_reports",
        "client_reports_insert_member",
        "INSERT",
        f"{MEMBER_OF_ACTIVE_CLIENT} AND requested_by = (SELECT auth.uid())",
    ),
)


def _version_table() -> str:
    context = op.get_context()
    schema = context.version_table_schema
    return f"{schema}.{context.version_table}" if schema else context.version_table


def upgrade() -> None:
    """Enable RLS with membership policies, grant the minimum, make audit_log append-only."""
    tables = ", ".join(f"public.{name}" for name in TABLES)

    op.execute(f"CREATE SCHEMA {PRIVATE}")
    op.execute(f"REVOKE ALL ON SCHEMA {PRIVATE} FROM PUBLIC")
    op.execute(f"GRANT USAGE ON SCHEMA {PRIVATE} TO authenticated, service_role")
    op.execute(MEMBER_CLIENT_IDS)
    op.execute(IS_MEMBER)
    op.execute(APPEND_ONLY)
    functions = (
        f"{PRIVATE}.member_client_ids(text), {PRIVATE}.is_member(uuid, text), "
        f"{PRIVATE}.refuse_audit_log_change()"
    )
    op.execute(f"REVOKE ALL ON FUNCTION {functions} FROM PUBLIC")
    op.execute(
        f"GRANT EXECUTE ON FUNCTION {PRIVATE}.member_client_ids(text), "
        f"{PRIVATE}.is_member(uuid, text) TO authenticated, service_role"
    )

    # Grants: everything off, then the minimum each role needs.
    op.execute(f"REVOKE ALL ON TABLE {tables} FROM PUBLIC, anon, authenticated, service_role")
    op.execute(
        "GRANT SELECT ON TABLE public.clients, public.memberships, public.client_events, "
        "public.client_daily_metrics, public.client_reports TO authenticated"
    )
    # NOTE: column list: a user cannot choose a report's id or created_at.
    op.execute(
        "GRANT INSERT (client_id, requested_by, period_start, period_end, totals, flow_run_id) "
        "ON TABLE public.client_reports TO authenticated"
    )
    op.execute(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE public.clients, public.memberships, "
        "public.client_events, public.client_daily_metrics, public.client_reports "
        "TO service_role"
    )
    op.execute("GRANT SELECT, INSERT ON TABLE public.audit_log TO service_role")
    # NOTE: identity columns need no grant on their sequences (checked on PostgreSQL 15).
    # NOTE: Alembic's own table sits in `public` too; on Supabase anon could otherwise
    # rewrite it through the Data API. Left locked on downgrade (harmless).
    op.execute(f"REVOKE ALL ON TABLE {_version_table()} FROM PUBLIC, anon, authenticated")
    op.execute(f"ALTER TABLE {_version_table()} ENABLE ROW LEVEL SECURITY")

    for name in TABLES:
        op.execute(f"ALTER TABLE public.{name} ENABLE ROW LEVEL SECURITY")
    for name in FORCED:
        op.execute(f"ALTER TABLE public.{name} FORCE ROW LEVEL SECURITY")
    for table, policy, command, condition in POLICIES:
        clause = "WITH CHECK" if command == "INSERT" else "USING"
        op.execute(
            f"CREATE POLICY {policy} ON public.{table} AS PERMISSIVE FOR {command} "
            f"TO authenticated {clause} ({condition})"
        )

    op.execute(
        "CREATE TRIGGER audit_log_append_only "
        "BEFORE UPDATE OR DELETE OR TRUNCATE ON public.audit_log "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {PRIVATE}.refuse_audit_log_change()"
    )


def downgrade() -> None:
    """Drop policies, helpers and the trigger; leave the tables with no grants (closed)."""
    tables = ", ".join(f"public.{name}" for name in TABLES)

    op.execute("DROP TRIGGER audit_log_append_only ON public.audit_log")
    for table, policy, _command, _condition in reversed(POLICIES):
        op.execute(f"DROP POLICY {policy} ON public.{table}")
    for name in FORCED:
        op.execute(f"ALTER TABLE public.{name} NO FORCE ROW LEVEL SECURITY")
    for name in TABLES:
        op.execute(f"ALTER TABLE public.{name} DISABLE ROW LEVEL SECURITY")
    # NOTE: not back to Supabase's defaults (ALL to anon): without RLS that would open
    # every row to anyone with the anon key. The tables stay reachable by postgres only.
    op.execute(f"REVOKE ALL ON TABLE {tables} FROM PUBLIC, anon, authenticated, service_role")
    op.execute(f"DROP FUNCTION {PRIVATE}.refuse_audit_log_change()")
    op.execute(f"DROP FUNCTION {PRIVATE}.is_member(uuid, text)")
    op.execute(f"DROP FUNCTION {PRIVATE}.member_client_ids(text)")
    op.execute(f"DROP SCHEMA {PRIVATE}")
