"""Helpers of the migration tests: scratch databases and a schema fingerprint."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from tenantflow.settings import Settings, load_settings
from tenantflow_dev import StackConfig

SCHEMAS = ("public", "tenantflow_private")
BOOTSTRAP_SQL = resources.files("tenantflow_dev").joinpath("supabase_bootstrap.sql").read_text()

# NOTE: what Supabase does in every project and the local bootstrap does not (yet): new
# objects `postgres` creates in `public` are granted to the API roles. Scratch databases
# get it, so the tests show the migrations revoke it.
SUPABASE_DEFAULT_PRIVILEGES = """
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
    GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
    GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
    GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
"""


@dataclass(frozen=True)
class ScratchDatabase:
    """A database of the stack's cluster that only one test uses."""

    name: str
    config: StackConfig

    def url(self, port: int) -> str:
        url = make_url(self.config.url(port)).set(database=self.name)
        return url.render_as_string(hide_password=False)

    @property
    def migration_url(self) -> str:
        """Through the stack's PgBouncer session pool, as the owner `postgres`."""
        return self.url(self.config.session_pooler_port)

    @property
    def transaction_url(self) -> str:
        """Through the transaction pool, as the workers' role."""
        url = make_url(self.config.database_url).set(database=self.name)
        return url.render_as_string(hide_password=False)

    def settings(self, **overrides: Any) -> Settings:
        return load_settings(
            migration_database_url=self.migration_url,
            database_url=self.transaction_url,
            **overrides,
        )

    async def connect(self, *, admin: bool = False, port: int | None = None) -> Any:
        parts = self.config.connect_parts(port or self.config.pg_port, admin=admin)
        parts["database"] = self.name
        return await asyncpg.connect(**parts, statement_cache_size=0)


async def _admin(config: StackConfig, sql: str, database: str | None = None) -> None:
    parts = config.connect_parts(config.pg_port, admin=True)
    if database:
        parts["database"] = database
    conn = await asyncpg.connect(**parts)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(config: StackConfig, *, bootstrap: bool = True) -> ScratchDatabase:
    """CREATE DATABASE owned by `postgres`; with Supabase's `auth` schema unless told not."""
    name = f"tf_mig_{uuid.uuid4().hex[:10]}"
    await _admin(config, f'CREATE DATABASE "{name}" OWNER postgres')
    if bootstrap:
        await _admin(config, BOOTSTRAP_SQL + SUPABASE_DEFAULT_PRIVILEGES, name)
    return ScratchDatabase(name, config)


async def drop_database(database: ScratchDatabase) -> None:
    await _admin(database.config, f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')


_FINGERPRINT_QUERIES = {
    "schemas": """
        SELECT nspname, nspacl::text FROM pg_namespace
        WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
    """,
    "relations": """
        SELECT c.oid::regclass::text, c.relkind, c.relrowsecurity, c.relforcerowsecurity,
               c.relacl::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY($1::text[])
    """,
    "columns": """
        SELECT table_schema, table_name, column_name, ordinal_position, data_type,
               is_nullable, column_default, is_identity, identity_generation
        FROM information_schema.columns WHERE table_schema = ANY($1::text[])
    """,
    "column_grants": """
        SELECT a.attrelid::regclass::text, a.attname, a.attacl::text
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY($1::text[]) AND a.attacl IS NOT NULL
    """,
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = ANY($1::text[])
    """,
    "indexes": """
        SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = ANY($1::text[])
    """,
    "policies": """
        SELECT schemaname, tablename, policyname, permissive, roles::text, cmd, qual, with_check
        FROM pg_policies WHERE schemaname = ANY($1::text[])
    """,
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), p.proacl::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = ANY($1::text[])
    """,
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT t.tgisinternal AND n.nspname = ANY($1::text[])
    """,
}


async def fingerprint(
    conn: Any, *, without: tuple[str, ...] = ()
) -> dict[str, list[tuple[Any, ...]]]:
    """Everything the migrations define, as sorted rows; equal before/after = no change.

    `without` drops rows mentioning any of those names (e.g. Alembic's own table).
    """
    result: dict[str, list[tuple[Any, ...]]] = {}
    for name, query in _FINGERPRINT_QUERIES.items():
        args = () if "$1" not in query else (list(SCHEMAS),)
        rows = [tuple(row) for row in await conn.fetch(query, *args)]
        rows = [row for row in rows if not any(w in str(row) for w in without)]
        result[name] = sorted(rows, key=repr)
    version = await conn.fetchval("SELECT to_regclass('public.alembic_version')::text")
    result["version"] = (
        [tuple(row) for row in await conn.fetch("SELECT version_num FROM alembic_version")]
        if version
        else []
    )
    return result
