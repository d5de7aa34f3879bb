"""The stack's Prefect server processes, behind basic auth, with retention.

`single` topology (the default): one `prefect server start` (`PrefectServer`). `ha`
topology, as Prefect documents for several servers: API replicas
(`prefect server start --no-services`, `PrefectApiReplica`) behind the load balancer,
the background services in a process of their own (`prefect server services start`,
`PrefectServices`), and Redis between them for messaging, event ordering, concurrency
leases and the docket. Every one of them gets the same settings (`prefect_settings`):
auth, CORS, retention, batch sizes, the database.

They stay root's (when root starts the stack), each in a folder only its user can read.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import asyncpg
import httpx

from tenantflow_dev.config import PREFECT_DB_NAME, StackConfig
from tenantflow_dev.errors import StackError
from tenantflow_dev.health import Health
from tenantflow_dev.postgres import Postgres
from tenantflow_dev.processes import pid_alive
from tenantflow_dev.service import HttpProcessService

__all__ = [
    "PREFECT_HA",
    "PREFECT_LEASES",
    "PREFECT_RETENTION",
    "PrefectApiReplica",
    "PrefectServer",
    "PrefectServices",
    "prefect_healthy",
    "prefect_processes",
    "prefect_settings",
    "upgrade_prefect_database",
]


class _PrefectProcess(HttpProcessService):
    """A Prefect server process of the stack: its home in the stack folder (0700, umask
    077), its data in PostgreSQL, the stack's settings (`prefect_settings`)."""

    what = "the Prefect server"
    port_variable = "TENANTFLOW_PREFECT_PORT"
    ready_timeout = 90
    stop_grace = 20
    umask = 0o077

    def prepare(self) -> None:
        if self.config.prefect_database == "postgres":
            Postgres(self.config).ensure_prefect_database()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        # NOTE: files written before the umask was set (an older stack folder) lose
        # their group and other bits too.
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                path = Path(folder) / name
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode & 0o700)

    @property
    def database_kind(self) -> str:
        return "PostgreSQL" if self.config.prefect_database == "postgres" else "SQLite"

    def environment(self) -> dict[str, str]:
        # NOTE: no database setting of ours may come from the caller's environment (a
        # developer's shell pointing Prefect at another database).
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_"))
        }
        env.update(prefect_settings(self.config))
        env.update({"PREFECT_HOME": str(self.root), "PREFECT_SERVER_API_PORT": str(self.port)})
        return env


class PrefectServer(_PrefectProcess):
    """`prefect server start`, API and background services in one process (`single`).

    The data lives in the database `prefect` of the stack's cluster, reached directly as
    the role `prefect` (`TENANTFLOW_PREFECT_DATABASE=sqlite`: in SQLite in its home).
    Whoever reaches the API can start flow runs, so it wants basic auth (the stack's
    `prefect_auth_string`; `/api/health` alone answers without), answers CORS for its own
    UI only, and keeps its folder and files from other OS users.
    """

    name = "prefect-server"
    folder = "prefect"

    @property
    def port(self) -> int:
        return self.config.prefect_port

    @property
    def address(self) -> str:
        return self.config.prefect_ui_url

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "prefect", "server", "start", "--no-prompt"]

    def answers(self) -> bool:
        return prefect_healthy(self.config, self.config.prefect_api_url)

    def health(self) -> Health:
        found = super().health()
        if found.running and not found.healthy and _prefect_open(self.config.prefect_api_url):
            # NOTE: a server started before the stack had an auth string answers anyone.
            detail = "answers without auth: restart it (make down && make up)"
            return Health(self.name, self.address, True, False, found.pid, detail)
        if found.healthy:
            return Health(self.name, self.address, True, True, found.pid, self.database_kind)
        return found


class PrefectApiReplica(_PrefectProcess):
    """One API replica of the `ha` topology: `prefect server start --no-services` on a
    port of its own (`TENANTFLOW_PREFECT_REPLICA_PORTS`), reached through the load
    balancer. It serves the API and the UI and runs the docket's webserver tasks; the
    schema is upgraded once beforehand (`upgrade_prefect_database`), never on its start.
    """

    port_variable = "TENANTFLOW_PREFECT_REPLICA_PORTS"

    def __init__(self, config: StackConfig, number: int) -> None:
        self.number = number
        self.name = f"prefect-api-{number}"
        self.folder = f"prefect-api-{number}"
        self.what = f"Prefect API replica {number}"
        super().__init__(config)

    @property
    def port(self) -> int:
        return self.config.prefect_replica_ports[self.number - 1]

    @property
    def api_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/api"

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def prepare(self) -> None:
        super().prepare()
        upgrade_prefect_database(self.config)

    def argv(self) -> list[str]:
        return [
            sys.executable,
            *("-m", "prefect", "server", "start", "--no-prompt", "--no-services"),
        ]

    def answers(self) -> bool:
        return prefect_healthy(self.config, self.api_url)

    def health(self) -> Health:
        found = super().health()
        if found.healthy:
            return Health(self.name, self.address, True, True, found.pid, "PostgreSQL, API only")
        return found


class PrefectServices(_PrefectProcess):
    """The `ha` topology's background services, in a process of their own:
    `prefect server services start` (scheduler, triggers and automations, event
    persister, late runs, lease repossessor, vacuum, ...), coordinated through Redis."""

    name = "prefect-services"
    folder = "prefect-services"
    what = "the Prefect services"
    #: It listens on no port.
    port_variable = ""
    #: How long its process must have lived before it counts as up (it serves nothing
    #: one could ask; a bad setting ends it within seconds).
    settle_seconds = 5.0

    @property
    def port(self) -> int:
        return 0

    @property
    def address(self) -> str:
        return f"redis {self.config.host}:{self.config.redis_port}"

    def prepare(self) -> None:
        super().prepare()
        upgrade_prefect_database(self.config)

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.pop("PREFECT_SERVER_API_PORT")
        return env

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "prefect", "server", "services", "start"]

    def answers(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            started = self.pidfile.stat().st_mtime
        except OSError:
            return False
        return pid_alive(pid) and time.time() - started >= self.settle_seconds

    def health(self) -> Health:
        found = super().health()
        if found.healthy:
            return Health(
                self.name, self.address, True, True, found.pid, "PostgreSQL, background services"
            )
        return found


def prefect_processes(config: StackConfig) -> list[HttpProcessService]:
    """The Prefect server processes of the stack's topology (each holding the database
    login and `prefect_settings`): the one server, or the API replicas and the services."""
    if config.prefect_topology == "single":
        return [PrefectServer(config)]
    replicas = range(1, len(config.prefect_replica_ports) + 1)
    return [*(PrefectApiReplica(config, n) for n in replicas), PrefectServices(config)]


def prefect_settings(config: StackConfig) -> dict[str, str]:
    """What every Prefect server process of the stack is started with (the one server,
    or each API replica and the services process): one place for auth, CORS, retention,
    batch sizes, leases and, on the `ha` topology, Redis."""
    settings = {
        # NOTE: holds the `prefect` role's password: these processes' environment
        # only (readable by their own OS user alone), never printed.
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": config.prefect_database_url,
        "PREFECT_SERVER_API_AUTH_STRING": config.secrets.prefect_auth_string,
        "PREFECT_API_AUTH_STRING": config.secrets.prefect_auth_string,
        # NOTE: the UI calls the API from its own origin only (the stack's Prefect
        # address, the load balancer's on `ha`); no other web page may (the default is `*`).
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": config.prefect_ui_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": config.host,
        "PREFECT_SERVER_API_PORT": str(config.prefect_port),
        "PREFECT_API_URL": config.prefect_api_url,
        "PREFECT_UI_API_URL": config.prefect_api_url,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # NOTE: one flow run with 1,000 tenant tasks means thousands of task-run
        # events; the default batches of 1 kept the server's core busy for minutes.
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
        "PREFECT_SERVER_SERVICES_TRIGGERS_READ_BATCH_SIZE": "100",
        **PREFECT_RETENTION,
    }
    if config.prefect_topology == "ha":
        if config.prefect_database != "postgres":
            raise StackError(
                "the ha topology keeps Prefect's data in PostgreSQL: unset "
                "TENANTFLOW_PREFECT_DATABASE=sqlite (SQLite serves one server process only)"
            )
        # NOTE: holds Redis's password, like the database URL above.
        settings.update({**PREFECT_HA, "PREFECT_REDIS_MESSAGING_URL": config.redis_url})
        settings["PREFECT_SERVER_DOCKET_URL"] = config.redis_url
    else:
        # NOTE: leases of global-concurrency slots kept on disk (in PREFECT_HOME), not
        # in the server's memory: a server restart would otherwise forget the leases of
        # running flows, their releases would find nothing, and the slots of
        # `tenantflow-db` would stay taken for good.
        settings.update(PREFECT_LEASES)
    return settings


#: Where a self-hosted Prefect server keeps the leases of concurrency slots: on disk, so
#: they survive its restart (one server; several replicas share Redis instead).
PREFECT_LEASES = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
        "prefect.server.concurrency.lease_storage.filesystem"
    ),
}

#: The `ha` topology: what several Prefect processes share through Redis (prefect-redis),
#: and no process migrating the schema as it starts (`upgrade_prefect_database` does,
#: once). The Redis URL (`PREFECT_REDIS_MESSAGING_URL`, `PREFECT_SERVER_DOCKET_URL`) is
#: added per stack.
#: NOTE: the in-memory defaults are per process: with several, events would reach one
#: process's triggers only, leases one replica's memory, and every process's own docket
#: would schedule the same perpetual services again.
PREFECT_HA = {
    "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
    "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
}

#: Retention on the stack's Prefect server.
#: NOTE: every nightly sweep adds flow runs, thousands of task runs, their logs and events;
#: without these the Prefect database grows without bound. Prefect's vacuum service
#: deletes events after the events retention period (its default: events only), and
#: with `flow_runs` enabled also finished top-level flow runs whose end is older than its
#: own retention period, with their task runs, logs and artifacts (and, daily, orphans).
PREFECT_RETENTION = {
    # NOTE: ISO 8601 durations: the events setting takes no plain seconds.
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P7D",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": "P14D",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "3600",
}


def upgrade_prefect_database(config: StackConfig) -> None:
    """`prefect server database upgrade -y` on the stack's `prefect` database, once per
    Prefect version and schema: the `ha` topology's processes never migrate on start
    (several would race). Recorded in the stack folder with the schema's revision, so a
    new cluster, or another Prefect, is upgraded again."""
    marker = config.stack_dir / "prefect-schema"
    with open(config.stack_dir / "prefect-schema.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        revision = asyncio.run(_prefect_revision(config))
        done = f"prefect {version('prefect')} schema {revision}"
        if revision is not None and marker.exists() and marker.read_text().strip() == done:
            return
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_"))
        }
        env.update(prefect_settings(config))
        result = subprocess.run(
            [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
            env=env,
            cwd=config.stack_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise StackError(
                f"`prefect server database upgrade` failed (exit {result.returncode}): "
                + (tail[0] if tail else "no output")
            )
        revision = asyncio.run(_prefect_revision(config))
        marker.write_text(f"prefect {version('prefect')} schema {revision}\n")


async def _prefect_revision(config: StackConfig) -> str | None:
    """The Alembic revision of the `prefect` database (None: not migrated yet)."""
    parts = {**config.connect_parts(config.pg_port, admin=True), "database": PREFECT_DB_NAME}
    conn = await asyncpg.connect(**parts)
    try:
        exists = await conn.fetchval("SELECT to_regclass('public.alembic_version') IS NOT NULL")
        if not exists:
            return None
        found: str | None = await conn.fetchval("SELECT max(version_num) FROM alembic_version")
        return found
    finally:
        await conn.close()


def prefect_healthy(config: StackConfig, api_url: str) -> bool:
    """Whether the Prefect API at `api_url` takes the stack's auth string and wants it."""
    # NOTE: `/health` answers without auth; an authenticated route also proves that the
    # server takes this stack folder's auth string, and a refused anonymous one that it
    # wants auth at all.
    if _prefect_open(api_url):
        return False
    try:
        response = httpx.get(
            f"{api_url}/admin/version", headers=config.prefect_api_headers(), timeout=2
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _prefect_open(api_url: str) -> bool:
    """Whether the server answers an API request that carries no auth."""
    try:
        response = httpx.get(f"{api_url}/admin/version", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200
