"""The stack's Prefect server: `prefect server start`, behind basic auth, with retention.

It stays root's (when root starts the stack), in a folder only its user can read.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from tenantflow_dev.config import StackConfig
from tenantflow_dev.health import Health
from tenantflow_dev.postgres import Postgres
from tenantflow_dev.service import HttpProcessService

__all__ = ["PREFECT_LEASES", "PREFECT_RETENTION", "PrefectServer"]


class PrefectServer(HttpProcessService):
    """`prefect server start`, its home in the stack folder, its data in PostgreSQL.

    The data lives in the database `prefect` of the stack's cluster, reached directly as
    the role `prefect` (`TENANTFLOW_PREFECT_DATABASE=sqlite`: in SQLite in its home).
    Whoever reaches the API can start flow runs, so it wants basic auth (the stack's
    `prefect_auth_string`; `/api/health` alone answers without), answers CORS for its own
    UI only, and keeps its folder and files from other OS users (0700, umask 077).
    """

    name = "prefect-server"
    what = "the Prefect server"
    folder = "prefect"
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
    def port(self) -> int:
        return self.config.prefect_port

    @property
    def address(self) -> str:
        return self.config.prefect_ui_url

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "prefect", "server", "start", "--no-prompt"]

    def answers(self) -> bool:
        return _prefect_healthy(self.config)

    @property
    def database_kind(self) -> str:
        return "PostgreSQL" if self.config.prefect_database == "postgres" else "SQLite"

    def health(self) -> Health:
        found = super().health()
        if found.running and not found.healthy and _prefect_open(self.config):
            # NOTE: a server started before the stack had an auth string answers anyone.
            detail = "answers without auth: restart it (make down && make up)"
            return Health(self.name, self.address, True, False, found.pid, detail)
        if found.healthy:
            return Health(self.name, self.address, True, True, found.pid, self.database_kind)
        return found

    def environment(self) -> dict[str, str]:
        # NOTE: no database setting of ours may come from the caller's environment (a
        # developer's shell pointing Prefect at another database).
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_"))
        }
        env.update(
            {
                "PREFECT_HOME": str(self.root),
                # NOTE: holds the `prefect` role's password: this process's environment
                # only (readable by its own OS user alone), never printed.
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.config.prefect_database_url,
                "PREFECT_SERVER_API_AUTH_STRING": self.config.secrets.prefect_auth_string,
                "PREFECT_API_AUTH_STRING": self.config.secrets.prefect_auth_string,
                # NOTE: the UI calls the API from its own origin only; no other web page
                # may (the default is `*`).
                "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": self.config.prefect_ui_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_API_HOST": self.config.host,
                "PREFECT_SERVER_API_PORT": str(self.config.prefect_port),
                "PREFECT_API_URL": self.config.prefect_api_url,
                "PREFECT_UI_API_URL": self.config.prefect_api_url,
                "PREFECT_LOGGING_LEVEL": "WARNING",
                # NOTE: leases of global-concurrency slots kept on disk (in PREFECT_HOME),
                # not in the server's memory: a server restart would otherwise forget the
                # leases of running flows, their releases would find nothing, and the slots
                # of `tenantflow-db` would stay taken for good.
                **PREFECT_LEASES,
                # NOTE: one flow run with 1,000 tenant tasks means thousands of task-run
                # events; the default batches of 1 kept the server's core busy for minutes.
                "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
                "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "100",
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
                "PREFECT_SERVER_SERVICES_TRIGGERS_READ_BATCH_SIZE": "100",
                **PREFECT_RETENTION,
            }
        )
        return env


#: Where a self-hosted Prefect server keeps the leases of concurrency slots: on disk, so
#: they survive its restart (one server; several replicas need a shared store instead).
PREFECT_LEASES = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
        "prefect.server.concurrency.lease_storage.filesystem"
    ),
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


def _prefect_healthy(config: StackConfig) -> bool:
    # NOTE: `/health` answers without auth; an authenticated route also proves that the
    # server takes this stack folder's auth string, and a refused anonymous one that it
    # wants auth at all.
    if _prefect_open(config):
        return False
    try:
        response = httpx.get(
            f"{config.prefect_api_url}/admin/version",
            headers=config.prefect_api_headers(),
            timeout=2,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _prefect_open(config: StackConfig) -> bool:
    """Whether the server answers an API request that carries no auth."""
    try:
        response = httpx.get(f"{config.prefect_api_url}/admin/version", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200
