"""Worker containers: the tenantflow-worker image serving a pool of the local stack.

* `WorkerContainer` — one container of the image, run as a user runs it: `--network host`
  (the stack listens on 127.0.0.1), the tenant worker's settings from a file of its own
  (`tenant_worker_settings`: never `MIGRATION_DATABASE_URL`, never a value on the
  command line), the image's own worker as PID 1 with a name and a limit of its own.
* `worker_containers()` — the process pool served by N of them *instead of* the stack's
  own worker, which is stopped first and started again after: every worker of a pool
  takes any of its runs, so while the stack's worker polls, nothing proves which worker
  ran what. A pool of the containers' own would not do: a worker runs only the
  deployments the project's prefect.yaml declares for its own pool (`tenantflow.worker`).

NOTE: the flow runs' `infrastructure_pid` is a process id inside a container, not on this
machine; `LocalWorker` settles only the orphaned runs its own name took.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import httpx

from tenantflow.deployments import WORK_POOLS
from tenantflow.flow_environment import MIGRATION_ENV
from tenantflow_dev.config import StackConfig
from tenantflow_dev.errors import StackError
from tenantflow_dev.podman import IMAGE, Podman
from tenantflow_dev.processes import wait_for
from tenantflow_dev.worker import LocalWorker, heartbeat_time, worker_registration

__all__ = [
    "WorkerContainer",
    "tenant_worker_settings",
    "worker_containers",
    "write_settings_file",
]

log = logging.getLogger("tenantflow_dev")

#: The line the worker prints for each run it takes (Prefect's base worker).
_SUBMITTING = re.compile(r"Worker '(?P<worker>[^']+)' submitting flow run '(?P<run>[0-9a-f-]{36})'")
#: ... and the line it prints when another worker took that run first (both polled it).
_ABORTED = re.compile(r"Aborted submission of flow run '(?P<run>[0-9a-f-]{36})'")


def tenant_worker_settings(config: StackConfig) -> dict[str, str]:
    """A tenant worker's settings for the stack (what a Secret or `.env` would hold).

    The stack's settings without the schema owner's login, with Prefect's own polling
    (every 10 s): the worker starts a run when Prefect's events announce it.
    """
    settings = config.environment()
    settings.pop(MIGRATION_ENV, None)
    settings.pop("SEAL_PUBLIC_KEY", None)  # the operators' CLI's, not a worker's
    settings.update(
        {
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
    )
    return settings


def write_settings_file(path: Path, settings: Mapping[str, str]) -> Path:
    """`settings` as the `--env-file` of a container (one `NAME=value` a line), in a
    file only its owner reads: it holds worker secrets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.writelines(f"{key}={value}\n" for key, value in settings.items())
    return path


class WorkerContainer:
    """One container of the worker image serving `pool` of the stack, as `name`.

    The container and its worker share the name, so a flow run's `prefect.worker.name`
    label names the container that ran it.
    """

    def __init__(
        self,
        config: StackConfig,
        podman: Podman,
        *,
        name: str,
        folder: Path,
        pool: str = WORK_POOLS["process"],
        limit: int | None = None,
        image: str = IMAGE,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.extra_settings = dict(settings or {})
        self.podman = podman
        self.name = name
        self.pool = pool
        self.limit = limit
        self.image = image
        self.settings_file = folder / f"{name}.env"

    @property
    def worker_name(self) -> str:
        return self.name

    def write_settings(self) -> Path:
        """The settings file, readable by its owner only (it holds every worker secret)."""
        settings = {**tenant_worker_settings(self.config), **self.extra_settings}
        return write_settings_file(self.settings_file, settings)

    def start(self, timeout: float = 120) -> None:
        """Run the container and wait until its worker is registered with the pool."""
        started_at = datetime.now(UTC)
        self.podman.run_detached(
            self.image,
            name=self.name,
            env_file=self.write_settings(),
            network="host",
            command=[
                "tenantflow",
                "worker",
                "--pool",
                self.pool,
                "--name",
                self.worker_name,
                *(["--limit", str(self.limit)] if self.limit else []),
            ],
        )

        def registered() -> bool:
            if not self.running():
                raise StackError(
                    f"worker container {self.name} exited: {self.logs().strip()[-400:]}"
                )
            try:
                worker = worker_registration(self.config, self.pool, self.worker_name)
            except httpx.HTTPError:
                return False
            return worker is not None and heartbeat_time(worker) >= started_at

        try:
            wait_for(registered, timeout, f"worker container {self.name} to register")
        except StackError:
            self.remove()
            raise

    def running(self) -> bool:
        return self.podman.container_running(self.name)

    def logs(self) -> str:
        return self.podman.logs(self.name)

    def environment_names(self) -> set[str]:
        """The names (never the values) in the environment of the container's PID 1."""
        return self.podman.process_environment_names(self.name)

    def submitted_runs(self) -> set[UUID]:
        """The flow runs this container's worker says, in its log, that it took: those it
        began to submit, but for those another worker took first (two workers polling at
        once both try; the server gives the run to one)."""
        logs = self.logs()
        began = {
            UUID(found["run"])
            for found in _SUBMITTING.finditer(logs)
            if found["worker"] == self.worker_name
        }
        return began - {UUID(found["run"]) for found in _ABORTED.finditer(logs)}

    def kill(self) -> None:
        """SIGKILL the container (its worker and every flow run in it), as a dying
        machine would: nobody is left to report the runs' ends."""
        self.podman.kill(self.name)

    def remove(self) -> None:
        """Stop the container (SIGTERM, as `podman stop` sends) and remove it."""
        self.podman.remove(self.name, stop_seconds=30)


@contextlib.contextmanager
def worker_containers(
    config: StackConfig,
    folder: Path,
    *,
    count: int = 2,
    limit: int | None = None,
    prefix: str = "tenantflow-worker",
    settings: Mapping[str, str] | None = None,
) -> Iterator[list[WorkerContainer]]:
    """The process pool served by `count` worker containers instead of the stack's worker
    (each with `settings` over the tenant worker's).

    The stack's own worker is stopped first (it would take runs too) and started again
    afterwards, once the containers are removed.
    """
    podman = Podman.for_stack(config)
    main = LocalWorker(config)
    main.stop()
    containers = [
        WorkerContainer(
            config, podman, name=f"{prefix}-{n}", folder=folder, limit=limit, settings=settings
        )
        for n in range(1, count + 1)
    ]
    try:
        for container in containers:
            container.start()
        yield containers
    finally:
        for container in containers:
            try:
                container.remove()
            except StackError as error:
                log.warning("%s", error)
        main.start()
