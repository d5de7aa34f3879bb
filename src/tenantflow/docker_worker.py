"""The tenantflow docker worker: Prefect's docker worker (prefect-docker), with what runs locked.

Each flow run of `tenantflow-docker` is a container of the flow runs' image
(`TENANTFLOW_FLOW_RUN_IMAGE`), started through a Docker API (`DOCKER_HOST`: Docker, or
podman's `podman system service`). What the container is never comes from the API
(`tenantflow.container_jobs`): the job is rendered from the worker's own template with
job variables checked against its own schema, and then

* image: the worker's setting; command: `python -m tenantflow.container_run NAME` for a
  deployment its `prefect.yaml` declares (never `migrate`);
* network: the worker's `TENANTFLOW_DOCKER_NETWORK_MODE` (default `bridge`; `host` where the
  stack listens on 127.0.0.1), no other network; no volume but the settings file; not
  privileged; user 10001, every capability dropped, no new privileges; no extra hosts but
  Prefect's `host.docker.internal`; no registry login;
* environment: the run's ids, Prefect's API URL and the heartbeat only. The secrets
  (DATABASE_URL, SUPABASE_*, SEAL_PRIVATE_KEYS, PREFECT_API_AUTH_STRING ...) are in one
  settings file the worker writes when it starts (`container_settings()`, never
  MIGRATION_DATABASE_URL) in a folder only it can open, bind-mounted read-only at
  `/app/.env`: `podman inspect` of a flow-run container shows the mount's path, never a
  value (`--env-file` or `environment=` would show them all).

NOTE: the worker and the Docker engine must share the file system (a local socket): the
settings file's path is the engine's. A stopped worker exits at once and leaves its runs'
containers running; each reports its own end to Prefect. A run cancelled through the API
has its container stopped (`tenantflow.container_jobs.ContainerWorker`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shlex
import shutil
import tempfile
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar, cast
from uuid import UUID

import anyio.abc
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration, DockerWorkerResult  # type: ignore[import-untyped]
from pydantic import model_validator

from tenantflow.container_jobs import (
    RUN_USER,
    SETTINGS_MOUNT,
    ContainerWorker,
    LockedJobConfiguration,
    container_command,
    container_command_string,
    container_environment,
    container_settings,
    declared_container_deployment,
    flow_run_image,
    settings_file_text,
)
from tenantflow.deployments import PoolType
from tenantflow.errors import TenantflowError
from tenantflow.worker import flow_heartbeat_seconds

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

__all__ = [
    "NETWORK_MODE_ENV",
    "DockerUnreachable",
    "TenantflowDockerJobConfiguration",
    "TenantflowDockerWorker",
    "flow_run_settings_file",
]

_T = TypeVar("_T")
#: The worker setting: the flow-run containers' network mode (never a job variable).
NETWORK_MODE_ENV = "TENANTFLOW_DOCKER_NETWORK_MODE"
#: What every flow-run container is created with, beside the configuration's fields.
_CREATE_KWARGS: dict[str, Any] = {
    "user": RUN_USER,
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
}


def _network_mode() -> str:
    return os.environ.get(NETWORK_MODE_ENV) or "bridge"


@lru_cache(maxsize=1)
def flow_run_settings_file() -> Path:
    """The settings file of this worker's flow runs, written once, removed at exit.

    NOTE: its folder is the worker's alone (0700); the file itself is readable by anyone
    who reaches it, so the container's user (10001, or a mapped one under rootless
    podman) can read it through the bind mount.
    """
    folder = Path(tempfile.mkdtemp(prefix="tenantflow-docker-settings-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "flow-run.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(settings_file_text(container_settings()))
    path.chmod(0o444)
    return path


class TenantflowDockerJobConfiguration(
    LockedJobConfiguration,
    DockerWorkerJobConfiguration,  # type: ignore[misc]
):
    """A docker job configuration whose image, command, environment, mounts, network,
    user and privileges are the worker's."""

    pool_type: ClassVar[PoolType] = "docker"

    @model_validator(mode="after")
    def _locked(self) -> Self:
        self._lock()
        return self

    def _lock(self) -> None:
        # NOTE: whatever a template rendered into these is dropped as soon as the
        # configuration exists; `prepare_for_flow_run` fills in the command and env.
        self.command: str | None = None
        self.env: dict[str, str | None] = {}
        self.image = flow_run_image()
        self.registry_credentials = None
        self.networks: list[str] = []
        self.network_mode = _network_mode()
        self.volumes: list[str] = []
        self.privileged = False
        self.container_create_kwargs = dict(_CREATE_KWARGS)

    def _base_environment(self) -> dict[str, str]:
        # NOTE: instead of every Prefect setting of the worker (its API auth string among
        # them): the API's URL alone, rewritten for a bridge network as prefect-docker does.
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        if not url:
            return {}
        if self.get_network_mode() != "host":
            url = url.replace("localhost", "host.docker.internal").replace(
                "127.0.0.1", "host.docker.internal"
            )
        return {"PREFECT_API_URL": url}

    def get_extra_hosts(self, docker_client: Any) -> dict[str, str] | None:
        # NOTE: on the host network the host is 127.0.0.1 already (and prefect-docker would
        # warn about a Docker Engine version podman does not have).
        if self.get_network_mode() == "host":
            return None
        hosts: dict[str, str] | None = super().get_extra_hosts(docker_client)
        return hosts

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        """Raises RuntimeError (the run ends Crashed, no container is made) for a deployment
        the worker's project does not declare, or `migrate`."""
        name = declared_container_deployment(deployment)
        self._lock()
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        self.command = container_command_string(name)
        self.env = dict(container_environment(self.env, flow_heartbeat_seconds()))
        self.image = flow_run_image()
        self.volumes = [f"{flow_run_settings_file()}:{SETTINGS_MOUNT}:ro"]


class TenantflowDockerWorker(ContainerWorker, DockerWorker):  # type: ignore[misc]
    """Prefect's docker worker (type `docker`) that runs only declared code, its way."""

    pool_type: ClassVar[PoolType] = "docker"
    job_configuration = TenantflowDockerJobConfiguration
    _description = (
        "tenantflow's docker worker: each flow run is a container of the worker's image on "
        "the entrypoint the image's prefect.yaml declares; job variables, templates and "
        "deployments changed through the API cannot change its image, command, environment, "
        "mounts, network, user or privileges."
    )
    _display_name = "tenantflow docker"

    async def setup(self) -> None:
        # NOTE: now, so a setting that cannot go into the file, or a Docker engine that
        # does not answer, stops the worker at once rather than fails each run.
        flow_run_settings_file()
        await run_sync_in_worker_thread(_check_docker)
        await super().setup()

    async def run(
        self,
        flow_run: FlowRun,
        configuration: DockerWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> DockerWorkerResult:
        if (
            not isinstance(configuration, TenantflowDockerJobConfiguration)
            or shlex.split(configuration.command or "")[:-1] != container_command("")[:-1]
            or configuration.image != flow_run_image()
        ):
            raise RuntimeError(
                "refusing to start a flow run whose job configuration was not prepared by "
                "the tenantflow docker worker"
            )
        # NOTE: DockerWorker.run, but for where the container is watched: Prefect's runs
        # `container.wait()` in an anyio worker thread, which is not a daemon, so a worker
        # told to stop would not exit before every container it watches had ended.
        with self.running(flow_run.id):
            started: tuple[Any, Any] = await run_sync_in_worker_thread(
                self._create_and_start_container, configuration
            )
            container, created_event = started
            identifier: str = self._get_infrastructure_pid(container_id=container.id)
            if task_status is not None:
                task_status.started(identifier)
            container = await _in_daemon_thread(
                self._watch_container_safe, container, configuration, created_event
            )
        exit_code = container.attrs["State"].get("ExitCode")
        return DockerWorkerResult(
            status_code=exit_code if exit_code is not None else -1, identifier=identifier
        )


class DockerUnreachable(TenantflowError, RuntimeError):
    """The Docker API of `DOCKER_HOST` does not answer."""


def _check_docker() -> None:
    """Raises DockerUnreachable (one line, naming DOCKER_HOST) when the engine does not answer."""
    import docker  # type: ignore[import-untyped]
    import docker.errors  # type: ignore[import-untyped]

    try:
        client = docker.from_env(timeout=10)
        try:
            client.ping()
        finally:
            client.close()
    except docker.errors.DockerException as error:
        where = os.environ.get("DOCKER_HOST") or "the default socket"
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise DockerUnreachable(
            f"the Docker API at {where} (DOCKER_HOST) does not answer: {reason}; the docker "
            "worker starts its flow runs' containers through it"
        ) from None


async def _in_daemon_thread(call: Callable[..., _T], *args: Any) -> _T:
    """`call(*args)` in a daemon thread of its own: the process may exit while it blocks
    (a stopped worker leaves the container it was watching running)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if done.done():
            return  # the awaiting task was cancelled: the worker is stopping
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(cast(_T, result))

    def target() -> None:
        try:
            result, error = call(*args), None
        except BaseException as raised:  # handed to the awaiting task
            result, error = None, raised
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="tenantflow-docker-watch", daemon=True).start()
    return await done
