"""The stack's PostgreSQL 15 cluster: Supabase's roles and `auth` schema, durable settings.

The cluster lives in the stack folder, listens on 127.0.0.1 only, with scram auth. The
Prefect server keeps its data in its own database `prefect` of the same cluster, as its
own login `prefect`, which pg_hba.conf keeps out of every other database.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from importlib import resources
from pathlib import Path

import asyncpg

from tenantflow_dev.config import (
    PREFECT_DB_NAME,
    PREFECT_DB_ROLE,
    WORKER_DB_ROLE,
    StackConfig,
)
from tenantflow_dev.errors import StackError
from tenantflow_dev.health import Health, query_ok
from tenantflow_dev.os_users import as_service_user, service_dir, service_user_ids
from tenantflow_dev.processes import pid_alive, read_pid, run_checked
from tenantflow_dev.service import require_free_port

__all__ = ["DURABILITY_SETTINGS", "PG_BIN", "PREFECT_DB_EXTENSIONS", "Postgres"]

PG_BIN = Path("/usr/lib/postgresql/15/bin")

#: Prepended to the cluster's pg_hba.conf (first match wins): the Prefect server's login
#: reaches its own database only, over TCP.
_HBA_MARKER = "# tenantflow: the Prefect server's role logs in to its own database only"
_HBA_RULES = (
    f"{_HBA_MARKER}\n"
    f"host    {PREFECT_DB_NAME}    {PREFECT_DB_ROLE}    127.0.0.1/32    scram-sha-256\n"
    f"host    all    {PREFECT_DB_ROLE}    all    reject\n"
    f"local   all    {PREFECT_DB_ROLE}    reject\n\n"
)
#: What Prefect's PostgreSQL migrations create (`CREATE EXTENSION IF NOT EXISTS`); created
#: beforehand by the superuser, so the `prefect` role needs no more than its database.
PREFECT_DB_EXTENSIONS = ("pg_trgm",)


#: What a crash must not undo: with any of them off, PostgreSQL may acknowledge a commit
#: that a crash (`pg_ctl restart -m immediate`, a power cut) then loses.
DURABILITY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes")
_THROWAWAY_SETTINGS = (
    "# NOTE: a throwaway test cluster (TENANTFLOW_THROWAWAY_CLUSTER=1): faster, and a\n"
    "# crash may lose acknowledged commits. Never for a cluster whose data matters.\n"
    + "".join(f"{name} = off\n" for name in DURABILITY_SETTINGS)
)
_UNSAFE_LINE = re.compile(rf"^\s*({'|'.join(DURABILITY_SETTINGS)})\s*=\s*'?off'?\s*(#.*)?$")


async def _setting(conn: asyncpg.Connection, name: str) -> str:
    value: str = await conn.fetchval(f"SHOW {name}")
    return value


class Postgres:
    """A PostgreSQL 15 cluster in the stack folder, scram auth, 127.0.0.1 only."""

    name = "postgres"

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.root = config.stack_dir / "postgres"
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.logfile = self.root / "postgres.log"

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.pg_port}"

    def pid(self) -> int | None:
        pid = read_pid(self.data / "postmaster.pid")
        return pid if pid_alive(pid) else None

    def _initdb(self) -> None:
        secrets = self.config.secrets
        service_dir(self.root)
        service_dir(self.sockets)
        ids = service_user_ids()
        with tempfile.NamedTemporaryFile("w", dir=self.root, delete=False) as pwfile:
            pwfile.write(secrets.admin_password + "\n")
        try:
            if ids is not None:
                os.chown(pwfile.name, *ids)
            run_checked(
                as_service_user(
                    [
                        str(PG_BIN / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "supabase_admin",
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile.name}",
                        "--encoding=UTF8",
                        "--locale=C",
                    ]
                ),
                "initdb",
            )
        finally:
            os.unlink(pwfile.name)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(self.conf_text())

    def conf_text(self) -> str:
        """What the stack appends to a new cluster's postgresql.conf.

        Durable (PostgreSQL's defaults: fsync, synchronous_commit, full_page_writes on)
        unless the config is a throwaway test cluster.
        """
        return (
            "\n# tenantflow local stack\n"
            f"listen_addresses = '{self.config.host}'\n"
            f"port = {self.config.pg_port}\n"
            f"unix_socket_directories = '{self.sockets}'\n"
            "max_connections = 300\n"
            "shared_preload_libraries = 'pg_stat_statements'\n"
            "log_line_prefix = '%m [%p] %q%u@%d '\n"
        ) + (_THROWAWAY_SETTINGS if self.config.throwaway else "")

    def _durable_conf(self) -> bool:
        """Drop the durability trade-offs an older stack wrote into postgresql.conf.

        Returns whether the file changed. A throwaway cluster keeps them.
        """
        conf = self.data / "postgresql.conf"
        if self.config.throwaway or not conf.exists():
            return False
        text = conf.read_text()
        kept = [line for line in text.splitlines(keepends=True) if not _UNSAFE_LINE.match(line)]
        if len(kept) == len(text.splitlines(keepends=True)):
            return False
        # NOTE: in place, so the file keeps its owner (the service user) and mode.
        with conf.open("r+") as handle:
            handle.write("".join(kept))
            handle.truncate()
        return True

    def ensure_durable(self) -> list[str]:
        """Make a running cluster durable: fsync, synchronous_commit, full_page_writes on.

        Returns the settings that were off (and are now on). A cluster created by an
        older stack ran with them off; `ALTER SYSTEM` and a reload fix it without a
        restart (all three take effect on reload). A throwaway cluster is left alone.
        """
        if self.config.throwaway or self.pid() is None:
            return []
        changed = self._durable_conf()

        async def ensure() -> list[str]:
            parts = self.config.connect_parts(self.config.pg_port, admin=True)
            conn = await asyncpg.connect(**parts)
            try:
                if changed:
                    await conn.execute("SELECT pg_reload_conf()")
                off = [name for name in DURABILITY_SETTINGS if await _setting(conn, name) != "on"]
                for name in off:
                    await conn.execute(f"ALTER SYSTEM SET {name} = on")
                if off:
                    await conn.execute("SELECT pg_reload_conf()")
                # NOTE: a reload is a signal; each backend applies it between statements.
                deadline = time.monotonic() + 10
                while any([await _setting(conn, name) != "on" for name in DURABILITY_SETTINGS]):
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"PostgreSQL still runs with one of {', '.join(DURABILITY_SETTINGS)} "
                            f"off after a reload; see {self.data / 'postgresql.conf'}"
                        )
                    await asyncio.sleep(0.1)
                return off
            finally:
                await conn.close()

        return asyncio.run(ensure())

    def _restrict_prefect_role(self) -> bool:
        """Let the `prefect` login reach database `prefect` only (pg_hba.conf, first match).

        NOTE: in pg_hba.conf rather than by revoking CONNECT on `postgres` from PUBLIC,
        which would also change what every other role of the Supabase-like cluster may do.
        Returns whether the file changed (a running cluster must then reload it).
        """
        hba = self.data / "pg_hba.conf"
        text = hba.read_text()
        if _HBA_MARKER in text:
            return False
        hba.write_text(_HBA_RULES + text)
        return True

    def ensure_prefect_database(self) -> None:
        """The Prefect server's database and login on a running cluster (idempotent).

        NOTE: for a cluster started before the stack had them (an older stack folder that
        was not restarted); a fresh start creates them in `_bootstrap` already.
        """
        if self.pid() is None:
            raise StackError(
                "the Prefect server keeps its data in the stack's PostgreSQL, which is not "
                "running (or set TENANTFLOW_PREFECT_DATABASE=sqlite)"
            )
        reload = self._restrict_prefect_role()

        async def ensure() -> None:
            parts = self.config.connect_parts(self.config.pg_port, admin=True)
            conn = await asyncpg.connect(**parts)
            try:
                await conn.execute("SET pg_stat_statements.track_utility = off")
                if reload:
                    await conn.execute("SELECT pg_reload_conf()")
                await self._bootstrap_prefect(conn)
            finally:
                await conn.close()

        asyncio.run(ensure())

    def start(self) -> bool:
        if self.pid() is not None:
            return False
        require_free_port(self.config.host, self.config.pg_port, "postgres", "TENANTFLOW_PG_PORT")
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        self._restrict_prefect_role()
        self._durable_conf()
        service_dir(self.sockets)
        run_checked(
            as_service_user(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.logfile),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            "starting PostgreSQL",
        )
        asyncio.run(self._bootstrap())
        return True

    async def _bootstrap(self) -> None:
        """Supabase's roles, `auth` schema and privilege model (idempotent)."""
        sql = resources.files("tenantflow_dev").joinpath("supabase_bootstrap.sql")
        conn = await asyncpg.connect(**self.config.connect_parts(self.config.pg_port, admin=True))
        try:
            # NOTE: pg_stat_statements keeps utility statements' text as sent, passwords
            # included; none of this session's statements is worth tracking.
            await conn.execute("SET pg_stat_statements.track_utility = off")
            await conn.execute(sql.read_text())
            # NOTE: ALTER ROLE ... PASSWORD takes no bind parameters; quote it server-side.
            secrets = self.config.secrets
            literal = await conn.fetchval("SELECT quote_literal($1)", secrets.postgres_password)
            await conn.execute(f"ALTER ROLE postgres PASSWORD {literal}")
            # The workers' login, as a project's administrator creates it before migrating
            # (the migrations grant it what it may do, nothing more).
            literal = await conn.fetchval("SELECT quote_literal($1)", secrets.worker_password)
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", WORKER_DB_ROLE):
                await conn.execute(f"CREATE ROLE {WORKER_DB_ROLE} NOINHERIT")
            await conn.execute(f"ALTER ROLE {WORKER_DB_ROLE} LOGIN PASSWORD {literal}")
            await self._bootstrap_prefect(conn)
            # Older stack folders tracked them: forget those entries.
            if await conn.fetchval("SELECT to_regclass('public.pg_stat_statements')"):
                await conn.execute(
                    "SELECT pg_stat_statements_reset(userid, dbid, queryid) "
                    "FROM pg_stat_statements WHERE query ILIKE '%PASSWORD%'"
                )
        finally:
            await conn.close()

    async def _bootstrap_prefect(self, conn: asyncpg.Connection) -> None:
        """The Prefect server's database and login (idempotent), as the superuser.

        The role owns its database and nothing else: no superuser, CREATEROLE, CREATEDB,
        BYPASSRLS or replication; pg_hba.conf keeps it out of every other database, and
        only it (and superusers) may connect to `prefect`.
        """
        literal = await conn.fetchval(
            "SELECT quote_literal($1)", self.config.secrets.prefect_db_password
        )
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", PREFECT_DB_ROLE):
            await conn.execute(f"CREATE ROLE {PREFECT_DB_ROLE}")
        await conn.execute(
            f"ALTER ROLE {PREFECT_DB_ROLE} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB "
            f"NOBYPASSRLS NOREPLICATION INHERIT PASSWORD {literal}"
        )
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PREFECT_DB_NAME):
            # NOTE: CREATE DATABASE cannot run in a transaction; one statement is not in one.
            await conn.execute(f"CREATE DATABASE {PREFECT_DB_NAME} OWNER {PREFECT_DB_ROLE}")
        await conn.execute(f"ALTER DATABASE {PREFECT_DB_NAME} OWNER TO {PREFECT_DB_ROLE}")
        await conn.execute(f"REVOKE ALL ON DATABASE {PREFECT_DB_NAME} FROM PUBLIC")
        parts = self.config.connect_parts(self.config.pg_port, admin=True)
        prefect = await asyncpg.connect(**{**parts, "database": PREFECT_DB_NAME})
        try:
            for extension in PREFECT_DB_EXTENSIONS:
                await prefect.execute(f"CREATE EXTENSION IF NOT EXISTS {extension}")
        finally:
            await prefect.close()

    async def scram_secret(self, role: str = "postgres") -> str:
        conn = await asyncpg.connect(**self.config.connect_parts(self.config.pg_port, admin=True))
        try:
            secret: str = await conn.fetchval(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role
            )
        finally:
            await conn.close()
        return secret

    def stop(self) -> bool:
        if self.pid() is None:
            return False
        run_checked(
            as_service_user(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]
            ),
            "stopping PostgreSQL",
        )
        return True

    def health(self) -> Health:
        pid = self.pid()
        healthy, detail = False, "not running"
        if pid is not None:
            healthy, detail = query_ok(self.config.connect_parts(self.config.pg_port))
        return Health(self.name, self.address, pid is not None, healthy, pid, detail)
