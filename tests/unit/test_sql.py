"""SQL decided without a database: what the engine refuses to send through the transaction
pooler, and what a migration would run (Alembic's offline rendering)."""

from __future__ import annotations

import pytest

from tenantflow.db import session_state_refusal
from tenantflow.migrate import render_sql, script_directory

REFUSED = [
    "SET search_path TO public",
    "set session statement_timeout = 0",
    "  SET role postgres",
    "RESET ALL",
    "reset role",
    "DISCARD ALL",
    "LISTEN client_events",
    "PREPARE q AS SELECT 1",
    "DEALLOCATE ALL",
    "SELECT pg_advisory_lock(42)",
    "SELECT pg_try_advisory_lock(1, 2)",
    "select pg_advisory_unlock_shared(7)",
    "SELECT set_config('request.jwt.claims', '{}', false)",
    "SELECT set_config('role', 'x', FALSE)",
]
ALLOWED = [
    "SET LOCAL statement_timeout = 5000",
    "set local role authenticated",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('request.jwt.claims', '{}', true)",
    "SELECT pg_advisory_xact_lock(42)",
    "SELECT pg_try_advisory_xact_lock(1)",
    "SELECT 'SET search_path' AS text_not_a_statement",
    "INSERT INTO audit_log (action) VALUES ('reset')",
    "UPDATE clients SET name = 'x' WHERE id = $1",
]


@pytest.mark.parametrize("statement", REFUSED)
def test_session_state_is_refused_before_it_is_sent(statement: str) -> None:
    refusal = session_state_refusal(statement)
    assert refusal is not None
    assert "transaction pooler" in refusal and "SET LOCAL" in refusal


@pytest.mark.parametrize("statement", ALLOWED)
def test_transaction_scoped_statements_pass(statement: str) -> None:
    assert session_state_refusal(statement) is None


def test_the_upgrade_renders_offline_from_the_empty_database_to_the_single_head() -> None:
    [head] = script_directory().get_heads()
    sql = render_sql("upgrade", None, head)
    for expected in (
        "CREATE TABLE clients",
        "CREATE TABLE memberships",
        "CREATE TABLE audit_log",
        "ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY",
        "tenantflow_private.member_client_ids",
        "tenantflow_private.shard_grants",
        f"UPDATE alembic_version SET version_num='{head}'",
    ):
        assert expected in sql, expected
    # One transaction for the whole upgrade: all or nothing.
    assert sql.count("BEGIN;") == 1 and sql.rstrip().endswith("COMMIT;")


def test_a_downgrade_renders_offline_and_drops_what_the_upgrade_made() -> None:
    [head] = script_directory().get_heads()
    sql = render_sql("downgrade", head, None)
    assert "DROP TABLE clients" in sql and "DROP TABLE audit_log" in sql
    assert "DELETE FROM alembic_version" in sql
    assert sql.count("BEGIN;") == 1 and sql.rstrip().endswith("COMMIT;")
