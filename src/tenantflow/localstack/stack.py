"""The local stack: everything tenantflow needs, on this machine, in one folder.

`up` starts each part in order and is idempotent; `down` stops them in reverse
order and leaves no process behind; `status` reports each part's address and
health. After the services come the one-shot steps: migrations (through the
`migrate` flow), demo data, and the deployments; `demo_run()` then runs the main job
once, through the worker, as an operator would from the UI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field

from tenantflow.localstack.auth_server import AuthServer
from tenantflow.localstack.config import StackConfig
from tenantflow.localstack.demo import DemoRun, run_demo, seed_demo_data
from tenantflow.localstack.services import (
    Health,
    PgBouncer,
    Postgres,
    PrefectServer,
    Service,
    StackError,
    port_is_open,
    worker_user_ids,
)
from tenantflow.localstack.worker import LocalWorker, deploy

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
            LocalWorker(self.config),
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

    def up(self, *, services_only: bool = False) -> list[Health]:
        """Start every service, then (unless `services_only`) migrate, seed and deploy."""
        self.config.stack_dir.mkdir(parents=True, exist_ok=True)
        # NOTE: the service user must traverse it; secrets inside stay 0600.
        os.chmod(self.config.stack_dir, 0o755)  # noqa: S103
        for service in self.services():
            if service.start():
                log.info("started   %s", service.name)
            else:
                log.info("running   %s (already up)", service.name)
        self.write_env_file()
        if not services_only:
            self.migrate()
            counts = asyncio.run(seed_demo_data(self.config))
            log.info("demo data %s", ", ".join(f"{n} {k}" for k, n in counts.items()))
            result = deploy(self.config)
            log.info("deployed  %s", ", ".join(result.deployments))
        return self.status()

    def demo_run(self) -> DemoRun:
        """Start `nightly-rollup` as an operator would, through the worker, and wait for it."""
        return asyncio.run(run_demo(self.config))

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
        """Write `.env` so `uv run prefect ...` and `tenantflow ...` find the stack.

        It holds the database URLs and the Prefect API's auth string, never the stack's
        superuser password or JWT secret (those stay in the stack's secrets file).
        """
        lines = [
            "# Written by `tenantflow stack up` for the local stack. Do not commit.",
            # NOTE: single quotes: values are taken literally (the seal key is JSON).
            *(f"{key}='{value}'" for key, value in self.config.environment().items()),
        ]
        path = self.config.env_file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # NOTE: flow runs read `.env` from the project folder (tenantflow's and Prefect's
        # settings do); when they run as the worker's OS user, its group may read it.
        ids = worker_user_ids()
        if ids is not None:
            os.fchown(fd, -1, ids[1])
            os.fchmod(fd, 0o640)
        else:
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
