"""The stack's two PgBouncers (Debian's package): the transaction and the session pooler.

The transaction pooler is the workers' `DATABASE_URL`, the session pooler the migrations'
`MIGRATION_DATABASE_URL`, as on Supabase. Both log in with the cluster's scram secrets.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from typing import Literal

from tenantflow_dev.config import WORKER_DB_ROLE, StackConfig
from tenantflow_dev.health import Health, query_ok
from tenantflow_dev.os_users import as_service_user, service_dir, service_user_ids
from tenantflow_dev.postgres import Postgres
from tenantflow_dev.processes import pid_alive, port_is_open, read_pid, run_checked, wait_for
from tenantflow_dev.service import require_free_port

__all__ = ["PgBouncer", "PoolMode"]


PoolMode = Literal["transaction", "session"]


class PgBouncer:
    """One PgBouncer process (Debian's package) in transaction or session mode."""

    def __init__(self, config: StackConfig, mode: PoolMode) -> None:
        self.config = config
        self.mode = mode
        self.name = f"pgbouncer-{mode}"
        self.port = (
            config.transaction_pooler_port if mode == "transaction" else config.session_pooler_port
        )
        self.root = config.stack_dir / "pgbouncer"
        self.ini = self.root / f"{mode}.ini"
        self.pidfile = self.root / f"{mode}.pid"
        self.logfile = self.root / f"{mode}.log"
        self.userlist = self.root / "userlist.txt"

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def pid(self) -> int | None:
        pid = read_pid(self.pidfile)
        return pid if pid_alive(pid) else None

    def _write_config(self, scram_secrets: dict[str, str]) -> None:
        service_dir(self.root)
        ids = service_user_ids()
        self.userlist.write_text(
            "".join(f'"{role}" "{secret}"\n' for role, secret in scram_secrets.items())
        )
        self.userlist.chmod(0o600)
        self.ini.write_text(
            "[databases]\n"
            f"* = host={self.config.host} port={self.config.pg_port}\n"
            "\n[pgbouncer]\n"
            f"listen_addr = {self.config.host}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {self.userlist}\n"
            f"pool_mode = {self.mode}\n"
            f"default_pool_size = {self.config.pooler_pool_size}\n"
            "max_client_conn = 2000\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.logfile}\n"
            f"pidfile = {self.pidfile}\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
        )
        if ids is not None:
            for path in (self.userlist, self.ini):
                os.chown(path, *ids)

    def start(self) -> bool:
        if self.pid() is not None:
            return False
        variable = (
            "TENANTFLOW_TRANSACTION_POOLER_PORT"
            if self.mode == "transaction"
            else "TENANTFLOW_SESSION_POOLER_PORT"
        )
        require_free_port(self.config.host, self.port, self.name, variable)
        pgbouncer = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        postgres = Postgres(self.config)
        self._write_config(
            {
                role: asyncio.run(postgres.scram_secret(role))
                for role in ("postgres", WORKER_DB_ROLE)
            }
        )
        run_checked(as_service_user([pgbouncer, "-d", str(self.ini)]), f"starting {self.name}")
        wait_for(lambda: port_is_open(self.config.host, self.port), 15, f"{self.name} to listen")
        return True

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), 15, f"{self.name} to exit")
        return True

    def health(self) -> Health:
        pid = self.pid()
        healthy, detail = False, "not running"
        if pid is not None:
            healthy, detail = query_ok(self.config.connect_parts(self.port))
        return Health(self.name, self.address, pid is not None, healthy, pid, detail)
