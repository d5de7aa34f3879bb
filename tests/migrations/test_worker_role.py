"""The workers' login role: owns nothing, bypasses nothing, can only switch to two roles.

Each attack runs as `tenantflow_worker` through the transaction pooler, as a
compromised worker would, and must fail with a permission error and change nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tenantflow_dev import Stack
from tenantflow_dev.config import WORKER_DB_ROLE

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("main_database_at_head")]

AUDIT_SEQUENCE = "pg_get_serial_sequence('public.audit_log', 'id')"


@pytest.fixture
async def worker(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    config = stack.config
    conn = await asyncpg.connect(
        host=config.host,
        port=config.transaction_pooler_port,
        user=WORKER_DB_ROLE,
        password=config.secrets.worker_password,
        database=config.database,
        statement_cache_size=0,
    )
    try:
        yield conn
    finally:
        await conn.close()


async def _state(admin: asyncpg.Connection) -> tuple:
    """What the attacks would change: audit rows, the trigger, the sequence, the owner,
    the recorded schema revision."""
    return (
        await admin.fetchval("SELECT string_agg(version_num, ',') FROM public.alembic_version"),
        await admin.fetchval("SELECT count(*) FROM public.audit_log"),
        await admin.fetchval(
            "SELECT tgenabled FROM pg_trigger WHERE tgname = 'audit_log_append_only'"
        ),
        await admin.fetchval(f"SELECT pg_sequence_last_value({AUDIT_SEQUENCE})"),
        await admin.fetchval(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.audit_log'::regclass"
        ),
    )


@pytest.mark.parametrize(
    ("role", "statement"),
    [
        (None, "ALTER TABLE public.audit_log DISABLE TRIGGER audit_log_append_only"),
        (None, "ALTER TABLE public.audit_log DISABLE ROW LEVEL SECURITY"),
        (None, "SELECT count(*) FROM public.clients"),
        (
            None,
            "INSERT INTO public.audit_log (actor_kind, action, outcome) "
            "VALUES ('scheduler', 'forged', 'allowed')",
        ),
        (None, f"SELECT setval({AUDIT_SEQUENCE}, 1)"),
        ("service_role", "ALTER TABLE public.audit_log DISABLE TRIGGER audit_log_append_only"),
        ("service_role", "DELETE FROM public.audit_log"),
        ("service_role", "TRUNCATE public.audit_log"),
        ("service_role", f"SELECT setval({AUDIT_SEQUENCE}, 1)"),
        ("service_role", "DROP TABLE public.client_events"),
        ("service_role", "SELECT * FROM tenantflow_private.sealed_token_uses"),
        ("service_role", "UPDATE public.alembic_version SET version_num = 'forged'"),
        ("service_role", "DELETE FROM public.alembic_version"),
        ("service_role", "SELECT version_num FROM public.alembic_version"),
        ("authenticated", "UPDATE public.alembic_version SET version_num = 'forged'"),
        ("authenticated", f"SELECT setval({AUDIT_SEQUENCE}, 1)"),
        ("authenticated", "SELECT tenantflow_private.operator_app_metadata(gen_random_uuid())"),
        ("postgres", "SELECT 1"),
        ("supabase_admin", "SELECT 1"),
        ("anon", "SELECT 1"),
    ],
)
async def test_the_worker_role_cannot(
    worker: asyncpg.Connection, admin_conn: asyncpg.Connection, role: str | None, statement: str
) -> None:
    before = await _state(admin_conn)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with worker.transaction():
            if role is not None:
                await worker.execute(f"SET LOCAL ROLE {role}")
            await worker.execute(statement)
    assert await _state(admin_conn) == before


async def test_anon_cannot_move_the_identity_sequences(admin_conn: asyncpg.Connection) -> None:
    for table in ("audit_log", "client_events"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with admin_conn.transaction():
                await admin_conn.execute("SET LOCAL ROLE anon")
                await admin_conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('public.{table}', 'id'), 1)"
                )


async def test_the_worker_role_is_least_privilege(admin_conn: asyncpg.Connection) -> None:
    role = await admin_conn.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolinherit, rolcreaterole, rolcreatedb, rolreplication "
        "FROM pg_roles WHERE rolname = $1",
        WORKER_DB_ROLE,
    )
    assert dict(role) == {
        "rolsuper": False,
        "rolbypassrls": False,
        "rolinherit": False,
        "rolcreaterole": False,
        "rolcreatedb": False,
        "rolreplication": False,
    }
    member_of = await admin_conn.fetch(
        "SELECT r.rolname FROM pg_auth_members AS m JOIN pg_roles AS r ON r.oid = m.roleid "
        "JOIN pg_roles AS w ON w.oid = m.member WHERE w.rolname = $1 ORDER BY 1",
        WORKER_DB_ROLE,
    )
    assert [r["rolname"] for r in member_of] == ["authenticated", "service_role"]
    owned = await admin_conn.fetchval(
        "SELECT count(*) FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles "
        "WHERE rolname = $1)",
        WORKER_DB_ROLE,
    )
    assert owned == 0


async def test_the_worker_does_its_work_through_the_two_roles(
    worker: asyncpg.Connection,
) -> None:
    async with worker.transaction():
        await worker.execute("SET LOCAL ROLE service_role")
        assert await worker.fetchval("SELECT count(*) >= 0 FROM public.clients")
        assert await worker.fetchval("SELECT current_user") == "service_role"
    async with worker.transaction():
        await worker.execute("SET LOCAL ROLE authenticated")
        # No claims: RLS shows an anonymous caller nothing.
        assert await worker.fetchval("SELECT count(*) FROM public.client_events") == 0
