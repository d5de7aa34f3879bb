"""The local stack: everything tenantflow needs, on this machine, in one folder.

`up` starts, in order, each part that is down (idempotent); `restart` stops and starts
one part; `down` stops them in reverse order and leaves no process behind; `status`
reports each part's address and health. After the services come the one-shot steps, on
a new stack or when asked: migrations (through the `migrate` flow), demo data, and the
deployments; `demo_run()` then runs the main job once, through the worker, as an
operator would from the UI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tenantflow_dev.auth_stand_in import AuthServer
from tenantflow_dev.config import TOPOLOGY_RECORD, PrefectTopology, StackConfig
from tenantflow_dev.demo import DemoRun, run_demo, seed_demo_data
from tenantflow_dev.errors import StackError
from tenantflow_dev.health import Health
from tenantflow_dev.load_balancer import LoadBalancer
from tenantflow_dev.pgbouncer import PgBouncer
from tenantflow_dev.postgres import Postgres
from tenantflow_dev.prefect_server import prefect_processes
from tenantflow_dev.prefect_setup import deploy
from tenantflow_dev.processes import port_is_open
from tenantflow_dev.redis_server import RedisServer
from tenantflow_dev.service import Service
from tenantflow_dev.worker import LocalWorker

__all__ = ["Stack", "StackConfig", "StackError", "prefect_parts"]

log = logging.getLogger("tenantflow_dev")


def prefect_parts(config: StackConfig) -> list[Service]:
    """The stack's Prefect, in start order: the one server (`single`), or on `ha` Redis,
    the API replicas, the services process and the load balancer in front."""
    if config.prefect_topology == "single":
        return [*prefect_processes(config)]
    return [RedisServer(config), *prefect_processes(config), LoadBalancer(config)]


@dataclass
class Stack:
    config: StackConfig = field(default_factory=StackConfig.from_env)
    #: What the last `up()` did: the parts it started, and whether it ran the one-shot steps.
    started: list[str] = field(default_factory=list, init=False)
    ran_setup: bool = field(default=False, init=False)

    def services(self) -> list[Service]:
        """Long-running parts, in start order."""
        return [
            Postgres(self.config),
            PgBouncer(self.config, "transaction"),
            PgBouncer(self.config, "session"),
            AuthServer(self.config),
            *prefect_parts(self.config),
            LocalWorker(self.config),
            # NOTE: `migrate` has a pool and worker of its own, the only one holding the
            # schema owner's login (docs/operations.md).
            LocalWorker.for_migrate(self.config),
        ]

    def ports(self) -> list[int]:
        c = self.config
        ha = [c.redis_port, *c.prefect_replica_ports] if c.prefect_topology == "ha" else []
        return [
            c.pg_port,
            c.transaction_pooler_port,
            c.session_pooler_port,
            c.auth_port,
            c.prefect_port,
            *ha,
        ]

    def other_topology_parts(self) -> list[Service]:
        """The Prefect parts of the topology this stack is not on (`down` stops them too,
        so a stack switched from one to the other leaves nothing behind)."""
        other: PrefectTopology = "single" if self.config.prefect_topology == "ha" else "ha"
        return prefect_parts(dataclasses.replace(self.config, prefect_topology=other))

    @property
    def setup_marker(self) -> Path:
        """Written once the one-shot steps (migrate, seed, deploy) have run on this folder."""
        return self.config.stack_dir / "setup-done"

    def is_set_up(self) -> bool:
        """Whether the cluster exists and the one-shot steps have run on it."""
        return (
            Postgres(self.config).data.joinpath("PG_VERSION").exists()
            and self.setup_marker.exists()
        )

    def service(self, name: str) -> Service:
        """The part called `name` (as `status()` shows it)."""
        for service in self.services():
            if service.name == name:
                return service
        names = ", ".join(service.name for service in self.services())
        raise StackError(f"no part called {name!r}: choose one of {names}")

    def up(self, *, setup: bool | None = None) -> list[Health]:
        """Start what is down, then the one-shot steps: migrate, seed and deploy.

        `setup=None` runs the one-shot steps only on a new stack (no cluster yet, or they
        never finished on it), so bringing back one part takes seconds; True runs them
        always (`make up`), False never.
        """
        self.config.stack_dir.mkdir(parents=True, exist_ok=True)
        # NOTE: the service user must traverse it; secrets inside stay 0600.
        os.chmod(self.config.stack_dir, 0o755)  # noqa: S103
        if setup is None:
            setup = not self.is_set_up()
        # NOTE: what later commands (`status`, `down`, the tests) find without the setting.
        self.config.stack_dir.joinpath(TOPOLOGY_RECORD).write_text(
            self.config.prefect_topology + "\n"
        )
        self.started = []
        for service in reversed(self.other_topology_parts()):
            if service.stop():
                log.info(
                    "stopped   %s (the stack is %s now)", service.name, self.config.prefect_topology
                )
        for service in self.services():
            if service.start():
                self.started.append(service.name)
                log.info("started   %s", service.name)
            else:
                log.info("running   %s (already up)", service.name)
        fixed = Postgres(self.config).ensure_durable()
        if fixed:
            log.info("durable   postgres: %s were off, now on", ", ".join(fixed))
        self.write_env_file()
        if setup:
            self.setup_marker.unlink(missing_ok=True)
            self.migrate()
            counts = asyncio.run(seed_demo_data(self.config))
            log.info("demo data %s", ", ".join(f"{n} {k}" for k, n in counts.items()))
            result = deploy(self.config)
            log.info("deployed  %s", ", ".join(result.deployments))
            self.setup_marker.write_text("migrated, seeded and deployed\n")
        self.ran_setup = setup
        return self.status()

    def restart(self, name: str) -> Health:
        """Stop the part called `name` (if it runs) and start it again."""
        service = self.service(name)
        service.stop()
        service.start()
        if isinstance(service, Postgres):
            service.ensure_durable()
        return service.health()

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
        for service in reversed(self.other_topology_parts()):
            if service.stop():
                log.info("stopped   %s", service.name)
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

        It holds the database URLs (the migration login among them) and the Prefect API's
        auth string, never the stack's superuser password or JWT secret (those stay in the
        stack's secrets file). Only its owner reads it: the workers' OS users cannot (their
        settings come from their environment, and flow runs start in a folder of their
        own), so no tenant flow run can read the schema owner's login from it.
        """
        lines = [
            "# Written by `tenantflow-dev up` for the local stack. Do not commit.",
            # NOTE: single quotes: values are taken literally (the seal key is JSON).
            *(f"{key}='{value}'" for key, value in self.config.environment().items()),
        ]
        path = self.config.env_file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # NOTE: an older stack made it group-readable by the worker's OS user; not any more.
        os.fchown(fd, -1, os.getegid())
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
