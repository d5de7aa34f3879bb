"""worker role, sealed token uses, narrower grants

Revision ID: c41d7e9a2b10
Revises: bee7517585ab
Create Date: 2026-11-30 12:00:00.000000+00:00

Workers stop logging in as the table owner (docs/security.md, "Database roles"):

* `tenantflow_worker` is the workers' login role. It owns nothing, has no BYPASSRLS and
  NOINHERIT: on its own it can read nothing. Inside a transaction it switches with
  `SET LOCAL ROLE` to `authenticated` (a user's work, under row-level security) or to
  `service_role` (the guard's own reads and writes, and service-mode flows). The revision
  creates the role without LOGIN when it is missing; whoever administers the database
  gives it LOGIN and a password (on Supabase it then logs in through Supavisor as
  `tenantflow_worker.<project_ref>`). A role that already exists with SUPERUSER,
  BYPASSRLS or REPLICATION is refused: it would not be least privilege.
* `tenantflow_private.operator_app_metadata(user_id)` reads one user's `app_metadata`
  from `auth.users` (Supabase gives `service_role` no grant there), for the guard's
  operator check.
* `tenantflow_private.use_seal(...)` records that a sealed access token was opened by a
  flow run, and says which run holds it: a sealed token works in one flow run only.
  Rows are kept until an hour after the token expired; after that the seal is refused
  as expired anyway.
* `anon`, `authenticated` and `service_role` lose every privilege on the identity
  sequences of tenantflow's tables (Supabase's default privileges grant them, and
  `setval` would let them skew the ids); identity columns need none to insert.
* `authenticated` may no longer INSERT `client_reports` (through Supabase's Data API a
  member could have stored a report with made-up totals); the worker stores reports as
  `service_role`.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "c41d7e9a2b10"
down_revision: str | Sequence[str] | None = "bee7517585ab"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PRIVATE = "tenantflow_private"
WORKER_ROLE = "tenantflow_worker"
TABLES = (
    "clients",
    "memberships",
    "client_events",
    "client_daily_metrics",
    "client_reports",
    "audit_log",
)

ENSURE_WORKER_ROLE = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tenantflow_worker') THEN
        CREATE ROLE tenantflow_worker NOLOGIN NOINHERIT;
    END IF;
    IF EXISTS (
        SELECT FROM pg_roles
        WHERE rolname = 'tenantflow_worker' AND (rolsuper OR rolbypassrls OR rolreplication)
    ) THEN
        RAISE EXCEPTION 'role tenantflow_worker has SUPERUSER, BYPASSRLS or REPLICATION; '
            'the workers'' login role must have none of them'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END
$$
"""

OPERATOR_APP_METADATA = """
CREATE FUNCTION tenantflow_private.operator_app_metadata(user_id uuid)
RETURNS jsonb
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT u.raw_app_meta_data FROM auth.users AS u
    WHERE u.id = operator_app_metadata.user_id AND u.deleted_at IS NULL
$$
"""

CREATE_SEAL_USES = """
CREATE TABLE tenantflow_private.sealed_token_uses (
    seal_id text NOT NULL,
    flow_run_id uuid NOT NULL,
    flow text NOT NULL,
    used_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    CONSTRAINT pk_sealed_token_uses PRIMARY KEY (seal_id),
    CONSTRAINT ck_sealed_token_uses_seal_id CHECK (length(seal_id) BETWEEN 16 AND 128)
)
"""

# NOTE: returns the flow run that holds the seal: the caller's own id the first time
# (and on a retry of the same run), another run's id on a replay. ON CONFLICT DO NOTHING
# plus the read afterwards is race-free: the primary key decides who inserted first.
USE_SEAL = """
CREATE FUNCTION tenantflow_private.use_seal(
    seal_id text, flow_run_id uuid, flow text, expires_at timestamptz
)
RETURNS uuid
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    holder uuid;
BEGIN
    DELETE FROM tenantflow_private.sealed_token_uses AS s
    WHERE s.expires_at < now() - interval '1 hour';
    INSERT INTO tenantflow_private.sealed_token_uses AS s (seal_id, flow_run_id, flow, expires_at)
    VALUES (use_seal.seal_id, use_seal.flow_run_id, use_seal.flow, use_seal.expires_at)
    ON CONFLICT ON CONSTRAINT pk_sealed_token_uses DO NOTHING;
    SELECT s.flow_run_id INTO holder FROM tenantflow_private.sealed_token_uses AS s
    WHERE s.seal_id = use_seal.seal_id;
    RETURN holder;
END
$$
"""

# Identity sequences of tenantflow's tables (deptype 'i': owned by an identity column).
OWN_SEQUENCES = """
SELECT d.objid::regclass::text
FROM pg_depend AS d
JOIN pg_class AS s ON s.oid = d.objid AND s.relkind = 'S'
WHERE d.classid = 'pg_class'::regclass
  AND d.refobjid = ANY (ARRAY[{tables}]::regclass[])
  AND d.deptype IN ('a', 'i')
"""

REVOKE_SEQUENCES = f"""
DO $$
DECLARE
    sequence_name text;
BEGIN
    FOR sequence_name IN {
    OWN_SEQUENCES.format(tables=", ".join(f"'public.{name}'" for name in TABLES))
}
    LOOP
        EXECUTE format(
            'REVOKE ALL ON SEQUENCE %s FROM PUBLIC, anon, authenticated, service_role',
            sequence_name
        );
    END LOOP;
END
$$
"""

REPORT_INSERT_POLICY = (
    "CREATE POLICY client_reports_insert_member ON public.client_reports AS PERMISSIVE "
    "FOR INSERT TO authenticated WITH CHECK ("
    f"client_id IN (SELECT {PRIVATE}.member_client_ids()) "
    "AND requested_by = (SELECT auth.uid()))"
)


def upgrade() -> None:
    """The worker role and its narrow functions; fewer grants for the API roles."""
    op.execute(ENSURE_WORKER_ROLE)
    op.execute(f"ALTER ROLE {WORKER_ROLE} NOINHERIT NOCREATEDB NOCREATEROLE")
    op.execute(f"GRANT authenticated, service_role TO {WORKER_ROLE}")

    op.execute(OPERATOR_APP_METADATA)
    op.execute(CREATE_SEAL_USES)
    op.execute(
        f"REVOKE ALL ON TABLE {PRIVATE}.sealed_token_uses "
        "FROM PUBLIC, anon, authenticated, service_role"
    )
    op.execute(USE_SEAL)
    functions = (
        f"{PRIVATE}.operator_app_metadata(uuid), {PRIVATE}.use_seal(text, uuid, text, timestamptz)"
    )
    op.execute(f"REVOKE ALL ON FUNCTION {functions} FROM PUBLIC, anon, authenticated")
    op.execute(f"GRANT EXECUTE ON FUNCTION {functions} TO service_role")

    op.execute(REVOKE_SEQUENCES)

    op.execute("DROP POLICY client_reports_insert_member ON public.client_reports")
    op.execute("REVOKE INSERT ON TABLE public.client_reports FROM authenticated")


def downgrade() -> None:
    """Back to the previous grants; the role itself stays (roles are cluster-wide)."""
    op.execute(
        "GRANT INSERT (client_id, requested_by, period_start, period_end, totals, flow_run_id) "
        "ON TABLE public.client_reports TO authenticated"
    )
    op.execute(REPORT_INSERT_POLICY)
    op.execute(f"DROP FUNCTION {PRIVATE}.use_seal(text, uuid, text, timestamptz)")
    op.execute(f"DROP TABLE {PRIVATE}.sealed_token_uses")
    op.execute(f"DROP FUNCTION {PRIVATE}.operator_app_metadata(uuid)")
    op.execute(f"REVOKE authenticated, service_role FROM {WORKER_ROLE}")
