"""The local stack: everything tenantflow needs, on this machine, in one folder.

`up` starts each part in order and is idempotent; `down` stops them in reverse
order and leaves no process behind; `status` reports each part's address and
health. Parts added by later steps (the Supabase Auth stand-in, migrations, demo
data, deployments, a worker) slot into `_steps()`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field

from tenantflow.localstack.auth_server import AuthServer
from tenantflow.localstack.config import StackConfig
from tenantflow.localstack.services import (
    Health,
    PgBouncer,
    Postgres,
    PrefectServer,
    Service,
    StackError,
    port_is_open,
)

__all__ = ["Stack", "StackConfig", "StackError"]

log = logging.getLogger("tenantflow.stack")


@dataclass
class Stack:
    config: StackConfig = field(default_factory=StackConfig.from_env)

    def services(self) -> list[Service]:
        """Long-running parts, in start order."""
        return [
            Postgres(self.config),
            PgBouncer(self.config, "transaction"),
            PgBouncer(self.config, "session"),
            AuthServer(self.config),
            PrefectServer(self.config),
            # Process worker: issue 5.
        ]

    def ports(self) -> list[int]:
        c = self.config
        return [
            c.pg_port,
            c.transaction_pooler_port,
            c.session_pooler_port,
            c.auth_port,
            c.prefect_port,
        ]

    def up(self) -> list[Health]:
        self.config.stack_dir.mkdir(parents=True, exist_ok=True)
        # NOTE: the service user must traverse it; secrets inside stay 0600.
        os.chmod(self.config.stack_dir, 0o755)  # noqa: S103
        for service in self.services():
            if service.start():
                log.info("started   %s", service.name)
            else:
                log.info("running   %s (already up)", service.name)
        self.write_env_file()
        # One-shot steps after the services: migrations (issue 3), demo data and
        # deployments (issues 4 and 5) go here.
        self.migrate()
        return self.status()

    def migrate(self) -> None:
        """Bring the database to head through the `migrate` flow (`tenantflow migrate`).

        NOTE: a child process with the stack's environment, so the flow run is recorded
        by the stack's Prefect server (never a temporary one) and reads this stack's
        MIGRATION_DATABASE_URL, whatever this process's environment says.
        """
        result = subprocess.run(
            [sys.executable, "-m", "tenantflow.cli", "migrate"],
            cwd=self.config.project_dir,
            env={**os.environ, **self.config.environment()},
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"the migrate flow failed (exit {result.returncode}); see above")

    def down(self) -> None:
        for service in reversed(self.services()):
            if service.stop():
                log.info("stopped   %s", service.name)
            else:
                log.info("stopped   %s (was not running)", service.name)
        busy = [p for p in self.ports() if port_is_open(self.config.host, p)]
        if busy:
            raise StackError(f"ports still in use after down: {busy}")

    def status(self) -> list[Health]:
        return [service.health() for service in self.services()]

    def write_env_file(self) -> None:
        """Write `.env` so `uv run prefect ...` and `tenantflow ...` find the stack."""
        lines = [
            "# Written by `tenantflow stack up` for the local stack. Do not commit.",
            *(f"{key}={value}" for key, value in self.config.environment().items()),
        ]
        path = self.config.env_file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
