"""`tenantflow.migrate`: revisions, the session pooler, the lock, dry runs, all or nothing."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tenantflow.migrate import (
    MIGRATION_LOCK_KEY,
    MigrationError,
    MigrationLockTimeout,
    MigrationRefused,
    locked_migration_connection,
    run_migration,
    script_directory,
)
from tenantflow.schema import include_object, metadata
from tenantflow.settings import SettingsError, load_settings
from tenantflow_dev import Stack
from tests.migrations.conftest import NewDatabase
from tests.migrations.support import BOOTSTRAP_SQL, ScratchDatabase, fingerprint

pytestmark = pytest.mark.stack

SCRIPT = script_directory()
HEAD = SCRIPT.get_current_head()
REVISIONS = [script.revision for script in reversed(list(SCRIPT.walk_revisions()))]
FIRST = REVISIONS[0]
TENANT_TABLES = (
    "clients",
    "memberships",
    "client_events",
    "client_daily_metrics",
    "client_reports",
    "audit_log",
)


def test_exactly_one_head_and_every_revision_dated_and_reversible() -> None:
    assert len(SCRIPT.get_heads()) == 1
    assert len(REVISIONS) >= 2
    for script in SCRIPT.walk_revisions():
        assert re.match(
            rf"^\d{{4}}_\d{{2}}_\d{{2}}_{script.revision}_\w+\.py$", Path(script.path).name
        )
        downgrade = inspect.getsource(script.module.downgrade)
        assert "op." in downgrade, f"{script.revision} has no working downgrade"


async def _insert_data(conn: asyncpg.Connection) -> dict[str, uuid.UUID]:
    user, client = uuid.uuid4(), uuid.uuid4()
    await conn.execute(
        "INSERT INTO auth.users (id, email) VALUES ($1, $2)", user, f"{user.hex}@example.test"
    )
    await conn.execute("INSERT INTO clients (id, name) VALUES ($1, 'Acme')", client)
    await conn.execute(
        "INSERT INTO memberships (user_id, client_id, role, accepted_at) "
        "VALUES ($1, $2, 'owner', now())",
        user,
        client,
    )
    await conn.execute(
        "INSERT INTO client_events (client_id, occurred_at, kind, amount, payload) "
        "SELECT $1, now() - make_interval(mins => g), 'sale', g, jsonb_build_object('n', g) "
        "FROM generate_series(1, 3) AS g",
        client,
    )
    await conn.execute(
        "INSERT INTO client_daily_metrics (client_id, day, events, revenue) "
        "VALUES ($1, current_date, 3, 6)",
        client,
    )
    await conn.execute(
        "INSERT INTO client_reports (client_id, requested_by, period_start, period_end, totals) "
        "VALUES ($1, $2, current_date, current_date, '{}')",
        client,
        user,
    )
    await conn.execute(
        "INSERT INTO audit_log (actor_kind, actor_id, client_id, action, outcome) "
        "VALUES ('user', $1, $2, 'client-report', 'allowed')",
        user,
        client,
    )
    return {"user": user, "client": client}


async def _counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {name: await conn.fetchval(f"SELECT count(*) FROM {name}") for name in TENANT_TABLES}


async def test_upgrade_downgrade_upgrade_with_data(stack: Stack, scratch: ScratchDatabase) -> None:
    settings = scratch.settings()
    # NOTE: through the stack's PgBouncer session pool, as in production.
    assert make_url(settings.migration_database_url.get_secret_value()).port == (
        stack.config.session_pooler_port
    )
    conn = await scratch.connect()
    try:
        untouched = await fingerprint(conn)

        first = await run_migration(settings=settings)
        assert (first.before, first.after) == (None, HEAD)
        assert [step.revision for step in first.steps] == REVISIONS
        at_head = await fingerprint(conn)
        ids = await _insert_data(conn)
        counts = await _counts(conn)
        assert set(counts.values()) != {0}

        down = await run_migration(settings=settings, downgrade_to=FIRST)
        assert (down.before, down.after, down.action) == (HEAD, FIRST, "downgrade")
        assert await _counts(conn) == counts, "downgrading one revision must keep the data"

        again = await run_migration(settings=settings)
        assert (again.before, again.after) == (FIRST, HEAD)
        assert await fingerprint(conn) == at_head
        assert await _counts(conn) == counts

        # Down to base with data present: the tables go, Supabase's auth.users stays.
        base = await run_migration(settings=settings, downgrade_to="base")
        assert base.after is None
        assert await fingerprint(conn, without=("alembic_version",)) == untouched
        assert await conn.fetchval("SELECT count(*) FROM auth.users WHERE id = $1", ids["user"])

        last = await run_migration(settings=settings)
        assert (last.before, last.after) == (None, HEAD)
        assert await fingerprint(conn) == at_head
    finally:
        await conn.close()


async def test_schema_module_matches_the_migrations(scratch: ScratchDatabase) -> None:
    settings = scratch.settings()
    await run_migration(settings=settings)

    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(
            connection, opts={"include_object": include_object, "compare_type": True}
        )
        return list(compare_metadata(context, metadata))

    engine = create_async_engine(settings.migration_database_url.get_secret_value())
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


async def test_refuses_the_transaction_pooler_before_connecting(
    stack: Stack, scratch: ScratchDatabase
) -> None:
    config = stack.config
    password = config.secrets.postgres_password
    transaction_url = scratch.url(config.transaction_pooler_port)
    # NOTE: on a stack with the default ports the local transaction pooler is refused for
    # its port (Supavisor's 6543); with moved ports (TENANTFLOW_TRANSACTION_POOLER_PORT),
    # for being DATABASE_URL's own host and port.
    local_refusal = (
        "port 6543 is the transaction pooler"
        if config.transaction_pooler_port == 6543
        else "same host and port as DATABASE_URL"
    )

    with pytest.raises(SettingsError, match=local_refusal.replace(" is the", ".*the")) as refused:
        load_settings(migration_database_url=transaction_url)
    assert password not in str(refused.value)

    # Settings built without validation (model_copy) are checked again by the migration.
    settings = scratch.settings()
    unroutable = f"postgresql+asyncpg://postgres:{password}@203.0.113.7:6543/postgres"
    for url, message in (
        (transaction_url, local_refusal),
        (unroutable, "port 6543 is the transaction pooler"),
    ):
        bad = settings.model_copy(update={"migration_database_url": SecretStr(url)})
        for dry_run in (False, True):
            started = time.monotonic()
            with pytest.raises(MigrationRefused, match=message) as error:
                await run_migration(settings=bad, dry_run=dry_run)
            assert time.monotonic() - started < 1, "refused before any connection attempt"
            assert password not in str(error.value)

    same = settings.model_copy(update={"database_url": settings.migration_database_url})
    with pytest.raises(MigrationRefused, match="same host and port as DATABASE_URL"):
        await run_migration(settings=same)

    conn = await scratch.connect()
    try:
        assert (await fingerprint(conn))["version"] == []
        assert await conn.fetchval("SELECT to_regclass('public.alembic_version')") is None
    finally:
        await conn.close()


async def test_only_explicit_targets(scratch: ScratchDatabase) -> None:
    settings = scratch.settings()
    await run_migration(settings=settings)
    conn = await scratch.connect()
    try:
        at_head = await fingerprint(conn)
        refusals = (
            ({"downgrade_to": "-1"}, "explicit revision id"),
            ({"revision": "-1"}, "explicit revision id"),
            ({"revision": "+1"}, "explicit revision id"),
            ({"downgrade_to": "head~1"}, "explicit revision id"),
            ({"revision": FIRST}, "needs an explicit `downgrade_to`"),
            ({"revision": FIRST, "downgrade_to": "base"}, "not both"),
            ({"downgrade_to": "0123456789ab"}, "Can't locate revision"),
        )
        for arguments, message in refusals:
            with pytest.raises(MigrationRefused, match=re.escape(message)):
                await run_migration(settings=settings, **arguments)  # type: ignore[arg-type]
        assert await fingerprint(conn) == at_head
    finally:
        await conn.close()


async def test_unknown_database_revision_and_bad_credentials(scratch: ScratchDatabase) -> None:
    settings = scratch.settings()
    await run_migration(settings=settings)
    conn = await scratch.connect()
    try:
        await conn.execute("UPDATE alembic_version SET version_num = 'f00dfacef00d'")
        with pytest.raises(MigrationRefused, match="does not know"):
            await run_migration(settings=settings)
        with pytest.raises(MigrationRefused, match="does not know"):
            await run_migration(settings=settings, dry_run=True)
    finally:
        await conn.close()

    url = make_url(settings.migration_database_url.get_secret_value())
    wrong = url.set(password="not-the-password-0xC0FFEE").render_as_string(hide_password=False)
    bad = settings.model_copy(update={"migration_database_url": SecretStr(wrong)})
    with pytest.raises(MigrationError, match="could not connect to the session pooler") as error:
        await run_migration(settings=bad)
    assert "0xC0FFEE" not in str(error.value)


async def test_a_failing_upgrade_changes_nothing_and_frees_the_lock(
    new_database: NewDatabase,
) -> None:
    # No Supabase bootstrap: the first revision's foreign key to auth.users fails.
    bare = await new_database(bootstrap=False)
    settings = bare.settings()
    with pytest.raises(MigrationError, match="rolled back, the database is still at base"):
        await run_migration(settings=settings)
    conn = await bare.connect(admin=True)
    try:
        state = await fingerprint(conn)
        assert state["relations"] == [] and state["version"] == []
        assert not any(row[0] == "tenantflow_private" for row in state["schemas"])
        # The lock went with the failed run: with auth in place a run gets it at once.
        await conn.execute(BOOTSTRAP_SQL)
    finally:
        await conn.close()
    result = await run_migration(settings=settings, lock_timeout_s=0)
    assert result.after == HEAD


async def _hold_lock(stack: Stack, database: ScratchDatabase) -> asyncpg.Connection:
    conn = await database.connect(port=stack.config.session_pooler_port)
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    return conn


async def test_another_migration_holding_the_lock(stack: Stack, scratch: ScratchDatabase) -> None:
    settings = scratch.settings()
    holder = await _hold_lock(stack, scratch)
    try:
        started = time.monotonic()
        with pytest.raises(MigrationLockTimeout, match="another migration is running"):
            await run_migration(settings=settings, lock_timeout_s=1)
        assert 0.9 < time.monotonic() - started < 5
        assert await holder.fetchval("SELECT to_regclass('public.alembic_version')") is None

        # A second run waits for the lock and then applies.
        waiting = asyncio.create_task(run_migration(settings=settings, lock_timeout_s=20))
        await asyncio.sleep(1.0)
        assert not waiting.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        result = await asyncio.wait_for(waiting, 10)
        assert result.after == HEAD and len(result.steps) == len(REVISIONS)
        assert result.lock_wait_seconds >= 0.9
    finally:
        await holder.close()


async def test_the_lock_lives_on_the_session_pooler_connection(
    stack: Stack, scratch: ScratchDatabase, admin_conn: asyncpg.Connection
) -> None:
    held = (
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1 "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = $2"
    )
    async with locked_migration_connection(scratch.settings()) as connection:
        # Through PgBouncer's session port to PostgreSQL itself.
        assert await connection.scalar(text("SELECT inet_server_port()")) == stack.config.pg_port
        await connection.commit()
        assert await admin_conn.fetchval(held, scratch.name, MIGRATION_LOCK_KEY) == 1
    assert await admin_conn.fetchval(held, scratch.name, MIGRATION_LOCK_KEY) == 0


async def test_concurrent_runs_apply_once(
    scratch: ScratchDatabase, new_database: NewDatabase
) -> None:
    reference = await new_database()
    await run_migration(settings=reference.settings())

    settings = scratch.settings()
    results = await asyncio.gather(*(run_migration(settings=settings) for _ in range(4)))
    applied = [result for result in results if result.steps]
    assert len(applied) == 1
    assert all(result.nothing_to_do for result in results if result is not applied[0])
    assert {result.after for result in results} == {HEAD}

    conn, reference_conn = await scratch.connect(), await reference.connect()
    try:
        assert await fingerprint(conn) == await fingerprint(reference_conn)
    finally:
        await conn.close()
        await reference_conn.close()


async def test_dry_run_changes_nothing(scratch: ScratchDatabase) -> None:
    settings = scratch.settings()
    conn = await scratch.connect()
    try:
        before = await fingerprint(conn)
        dry = await run_migration(settings=settings, dry_run=True)
        assert dry.dry_run and (dry.before, dry.after, dry.target) == (None, None, HEAD)
        assert "CREATE TABLE clients" in dry.sql and "CREATE POLICY" in dry.sql
        assert "would upgrade base" in dry.summary() and "```sql" in dry.to_markdown()
        assert await fingerprint(conn) == before

        await run_migration(settings=settings, revision=FIRST)
        middle = await fingerprint(conn)
        dry = await run_migration(settings=settings, dry_run=True)
        assert (dry.before, dry.target) == (FIRST, HEAD)
        assert "CREATE POLICY" in dry.sql and "CREATE TABLE clients" not in dry.sql
        dry = await run_migration(settings=settings, dry_run=True, downgrade_to="base")
        assert "DROP TABLE clients" in dry.sql
        assert await fingerprint(conn) == middle

        await run_migration(settings=settings)
        dry = await run_migration(settings=settings, dry_run=True)
        assert dry.nothing_to_do and dry.sql == ""
    finally:
        await conn.close()


async def test_nothing_to_do_is_quick_and_says_so(scratch: ScratchDatabase) -> None:
    settings = scratch.settings()
    await run_migration(settings=settings)
    started = time.monotonic()
    result = await run_migration(settings=settings)
    assert time.monotonic() - started < 2
    assert result.nothing_to_do and (result.before, result.after) == (HEAD, HEAD)
    assert result.summary() == f"nothing to do: the database is already at {HEAD}"


async def test_grants_over_supabase_default_privileges(scratch: ScratchDatabase) -> None:
    """Supabase grants ALL on new public tables to the API roles; the migration takes it back."""
    await run_migration(settings=scratch.settings())
    conn = await scratch.connect()
    privileges = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
    try:
        granted = {
            (role, table): {
                privilege
                for privilege in privileges
                if await conn.fetchval(
                    "SELECT has_table_privilege($1, $2, $3)", role, f"public.{table}", privilege
                )
            }
            for role in ("anon", "authenticated", "service_role")
            for table in (*TENANT_TABLES, "alembic_version")
        }
        full = {"SELECT", "INSERT", "UPDATE", "DELETE"}
        for table in TENANT_TABLES:
            assert granted["anon", table] == set()
            expected = set() if table == "audit_log" else {"SELECT"}
            assert granted["authenticated", table] == expected
            assert granted["service_role", table] == (
                {"SELECT", "INSERT"} if table == "audit_log" else full
            )
        assert granted["anon", "alembic_version"] == set()
        assert granted["authenticated", "alembic_version"] == set()
        # Reports are written by the worker only: no column of them for members.
        for column in ("totals", "created_at", "client_id"):
            assert not await conn.fetchval(
                "SELECT has_column_privilege('authenticated', 'public.client_reports', $1, "
                "'INSERT')",
                column,
            )
        # No API role may touch the identity sequences (setval would skew the ids).
        sequences = [
            row[0]
            for row in await conn.fetch(
                "SELECT c.oid::regclass::text FROM pg_class AS c "
                "WHERE c.relkind = 'S' AND c.relnamespace = 'public'::regnamespace"
            )
        ]
        assert sequences
        for sequence in sequences:
            for role in ("anon", "authenticated", "service_role"):
                for privilege in ("USAGE", "SELECT", "UPDATE"):
                    assert not await conn.fetchval(
                        "SELECT has_sequence_privilege($1, $2, $3)", role, sequence, privilege
                    ), (role, sequence, privilege)
        # The guard's narrow functions: service_role only.
        for function in (
            "tenantflow_private.operator_app_metadata(uuid)",
            "tenantflow_private.use_seal(text, uuid, text, timestamptz)",
        ):
            for role, allowed in (
                ("anon", False),
                ("authenticated", False),
                ("service_role", True),
            ):
                assert (
                    await conn.fetchval(
                        "SELECT has_function_privilege($1, $2, 'EXECUTE')", role, function
                    )
                    is allowed
                ), (role, function)
        helper = "tenantflow_private.member_client_ids(text)"
        assert not await conn.fetchval(
            "SELECT has_function_privilege('anon', $1, 'EXECUTE')", helper
        )
        assert await conn.fetchval(
            "SELECT has_function_privilege('authenticated', $1, 'EXECUTE')", helper
        )
        assert not await conn.fetchval(
            "SELECT has_schema_privilege('anon', 'tenantflow_private', 'USAGE')"
        )
        flags = {
            row["relname"]: (row["relrowsecurity"], row["relforcerowsecurity"])
            for row in await conn.fetch(
                "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'"
            )
        }
        for table in TENANT_TABLES:
            assert flags[table][0], f"RLS is off on {table}"
        assert all(flags[t][1] for t in ("client_events", "client_reports", "audit_log"))
        definer = await conn.fetchrow(
            "SELECT prosecdef, proconfig FROM pg_proc WHERE oid = $1::regprocedure", helper
        )
        assert definer["prosecdef"] and definer["proconfig"] == ['search_path=""']
    finally:
        await conn.close()
