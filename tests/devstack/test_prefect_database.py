"""The stack's Prefect server keeps its data in its own PostgreSQL database.

Database `prefect` of the stack's cluster, as the login `prefect`, which owns that
database and nothing else and cannot reach the tenants' database. Raw HTTP for the API
(Prefect's client retries 503s, which would hide them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tenantflow_dev import Stack, StackConfig
from tenantflow_dev.prefect_server import PREFECT_RETENTION, PrefectServer, prefect_processes
from tenantflow_dev.worker import LocalWorker
from tests.prefect_load import FLOW_RUNS, REQUESTS, TASK_RUNS_PER_FLOW_RUN, Api, drive


def _process_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


async def _prefect_admin_conn(config: StackConfig) -> asyncpg.Connection:
    parts = config.connect_parts(config.pg_port, admin=True)
    return await asyncpg.connect(**{**parts, "database": "prefect"})


async def _prefect_role_conn(config: StackConfig, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=config.host,
        port=config.pg_port,
        user="prefect",
        password=config.secrets.prefect_db_password,
        database=database,
    )


@pytest.mark.stack
async def test_runs_are_stored_in_the_prefect_database_as_its_own_role(stack: Stack) -> None:
    config = stack.config
    assert config.prefect_database == "postgres"
    api = Api(config)
    try:
        flow_id = await api.flow_id("tenantflow-pg-probe")
        run = await api.post(
            "/flow_runs/",
            {"flow_id": flow_id, "name": f"probe-{uuid.uuid4()}", "state": {"type": "PENDING"}},
        )
    finally:
        await api.client.aclose()
    conn = await _prefect_admin_conn(config)
    try:
        stored = await conn.fetchrow(
            "SELECT name, state_type FROM flow_run WHERE id = $1", uuid.UUID(run["id"])
        )
        assert stored is not None
        assert stored["name"] == run["name"]
        assert stored["state_type"] == "PENDING"
        # The server's connections, and only those, log in as `prefect`.
        users = {
            row["usename"]
            for row in await conn.fetch(
                "SELECT DISTINCT usename FROM pg_stat_activity "
                "WHERE datname = 'prefect' AND pid <> pg_backend_pid()"
            )
        }
        assert users == {"prefect"}
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'prefect'"
        )
        assert owner == "prefect"
        role = await conn.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication, "
            "rolcanlogin FROM pg_roles WHERE rolname = 'prefect'"
        )
        assert dict(role) == {
            "rolsuper": False,
            "rolcreaterole": False,
            "rolcreatedb": False,
            "rolbypassrls": False,
            "rolreplication": False,
            "rolcanlogin": True,
        }
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r "
                "ON r.oid = m.member WHERE r.rolname = 'prefect'"
            )
            == 0
        )
        assert await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'") == 1
    finally:
        await conn.close()


@pytest.mark.stack
async def test_the_prefect_role_cannot_reach_the_tenants_data(
    stack: Stack, admin_conn: asyncpg.Connection
) -> None:
    config = stack.config
    # Its own database: yes.
    own = await _prefect_role_conn(config, "prefect")
    try:
        assert await own.fetchval("SELECT current_user") == "prefect"
    finally:
        await own.close()
    # The tenants' database: it cannot even log in.
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match=r"pg_hba\.conf"):
        await _prefect_role_conn(config, "postgres")
    # And were it let in, it could read none of the tenants' tables.
    for table in ("public.clients", "public.client_events", "auth.users"):
        async with admin_conn.transaction():
            await admin_conn.execute("SET LOCAL ROLE prefect")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await admin_conn.fetch(f"SELECT FROM {table} LIMIT 1")
    # The workers' login cannot reach Prefect's database either.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(
            host=config.host,
            port=config.pg_port,
            user="tenantflow_worker",
            password=config.secrets.worker_password,
            database="prefect",
        )


@pytest.mark.stack
def test_the_password_stays_in_the_servers_own_environment(stack: Stack) -> None:
    config = stack.config
    password = config.secrets.prefect_db_password
    # Every Prefect server process of the topology (one server, or replicas and services).
    servers = prefect_processes(config)
    for server in servers:
        pid = server.pid()
        assert pid is not None, server.name
        url = _process_environment(pid)["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
        assert url == config.prefect_database_url
        assert url.startswith(
            f"postgresql+asyncpg://prefect:{password}@127.0.0.1:{config.pg_port}/"
        )
        assert url.endswith("/prefect")
    # Redis's password (the `ha` topology's) goes the same way as the database's.
    secrets = [password, config.secrets.redis_password]
    worker = LocalWorker(config).pid()
    assert worker is not None
    for secret in secrets:
        assert secret not in "\0".join(_process_environment(worker).values())
        assert secret not in config.env_file.read_text()
        assert secret not in "".join(config.environment().values())
    status = subprocess.run(
        [sys.executable, "-m", "tenantflow_dev.cli", "status"],
        env={**os.environ, **config.location_environment()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stdout
    for server in servers:
        line = next(line for line in status.stdout.splitlines() if line.startswith(server.name))
        assert "ok (PostgreSQL" in line, line
    for secret in secrets:
        assert secret not in status.stdout + status.stderr
        assert all(secret not in server.logfile.read_text() for server in servers)


@pytest.mark.stack
@pytest.mark.slow
async def test_concurrent_runs_get_no_server_errors(stack: Stack) -> None:
    """8 flow runs driven at once, 265 requests in flight together: no 5xx at all."""
    load = await drive(stack.config)
    run_ids = load.run_ids
    assert len(load.statuses) == REQUESTS
    assert [s for s in load.statuses if s >= 300] == []
    conn = await _prefect_admin_conn(stack.config)
    try:
        states = await conn.fetch(
            "SELECT state_type FROM flow_run WHERE id = ANY($1::uuid[])",
            [uuid.UUID(r) for r in run_ids],
        )
        assert [row["state_type"] for row in states] == ["COMPLETED"] * FLOW_RUNS
        completed = await conn.fetchval(
            "SELECT count(*) FROM task_run WHERE flow_run_id = ANY($1::uuid[]) "
            "AND state_type = 'COMPLETED'",
            [uuid.UUID(r) for r in run_ids],
        )
        assert completed == FLOW_RUNS * TASK_RUNS_PER_FLOW_RUN
    finally:
        await conn.close()


@pytest.mark.stack
def test_retention_is_set_on_the_running_server(stack: Stack) -> None:
    for server in prefect_processes(stack.config):
        pid = server.pid()
        assert pid is not None, server.name
        environment = _process_environment(pid)
        assert {k: environment.get(k) for k in PREFECT_RETENTION} == PREFECT_RETENTION
    # And Prefect reads them as meant.
    probe = (
        "import json; from prefect.settings import get_current_settings as g; s = g().server; "
        "v = s.services.db_vacuum; print(json.dumps([s.events.retention_period.days, "
        "sorted(v.enabled_vacuum_types), v.retention_period.days]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **PREFECT_RETENTION},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout.splitlines()[-1]) == [7, ["events", "flow_runs", "orphans"], 14]


def test_sqlite_stays_available_by_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENANTFLOW_STACK_DIR", str(tmp_path / ".stack"))
    monkeypatch.delenv("TENANTFLOW_PREFECT_DATABASE", raising=False)
    # NOTE: SQLite serves one server process: the `ha` topology refuses it.
    monkeypatch.delenv("TENANTFLOW_PREFECT_TOPOLOGY", raising=False)
    assert StackConfig.from_env(tmp_path).prefect_database == "postgres"
    monkeypatch.setenv("TENANTFLOW_PREFECT_DATABASE", "sqlite")
    config = StackConfig.from_env(tmp_path)
    assert config.prefect_database == "sqlite"
    assert config.location_environment()["TENANTFLOW_PREFECT_DATABASE"] == "sqlite"
    # A database setting in the caller's environment never reaches the server.
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://x@y/z")
    server = PrefectServer(config)
    environment = server.environment()
    assert environment["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == (
        f"sqlite+aiosqlite:///{config.prefect_home / 'prefect.db'}"
    )
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in environment
    assert server.database_kind == "SQLite"
    postgres = PrefectServer(dataclasses.replace(config, prefect_database="postgres"))
    assert postgres.environment()["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://prefect:"
    )
    monkeypatch.setenv("TENANTFLOW_PREFECT_DATABASE", "mysql")
    with pytest.raises(ValueError, match="TENANTFLOW_PREFECT_DATABASE"):
        StackConfig.from_env(tmp_path)
