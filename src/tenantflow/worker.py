"""The tenantflow process worker: Prefect's process worker, with what runs locked.

Whoever can reach the Prefect API can create flow runs with any job variables, and
Prefect's process worker takes `command`, `env` and `working_dir` from them (and from the
work pool's template and the deployment): a run could start any program with the
worker's credentials, or change the worker's settings (say `SUPABASE_JWT_SECRET`). This
worker ignores all three, for every flow run, whoever set them: the flow-run process
always runs Prefect's engine (`python -m prefect.engine` with the worker's interpreter),
in the project's folder, with the worker's own environment plus the per-run variables
Prefect itself adds (`PREFECT__FLOW_RUN_ID` and the like).

Nor does it run what a deployment says through the API: deployments, their entrypoints
and their pull steps can be created or changed by whoever reaches the API, and pull steps
are code (`run_shell_script`). The worker looks the run's deployment up by name in its
own copy of the project's `prefect.yaml` (in `TENANTFLOW_PROJECT_DIR`) and starts the
engine in that folder on the entrypoint declared there (`PREFECT__FLOW_ENTRYPOINT`, which
makes Prefect load the flow without any pull step). A run of a deployment the project
does not declare is refused before any process starts, and ends Crashed saying so.

The process pool's base job template (`base_job_template()`) has no such variables and
refuses unknown ones (`additionalProperties: false`), so the Prefect server already
answers 422 to a run that asks for them; the worker holds even when the pool's template
has been changed through the API.

Every flow run it starts sends Prefect's flow-run heartbeat every `FLOW_HEARTBEAT_S`
seconds (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` in the run's environment): the bootstrap's
zombie automation marks Crashed a run whose heartbeats stop, when its process or machine
dies with the worker.

`tenantflow worker --pool NAME` starts it, as `prefect worker start` would.

What the worker locks, and why: docs/security.md and docs/flows.md.
"""

from __future__ import annotations

import asyncio
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from uuid import UUID

import anyio.abc
from prefect.utilities.processutils import command_to_string, get_sys_executable
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult
from pydantic import PrivateAttr, model_validator

from tenantflow.project import PROJECT_DIR_ENV, DeployError, declared_deployment
from tenantflow.settings import load_fault_settings

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

__all__ = [
    "ENTRYPOINT_ENV",
    "HEARTBEAT_ENV",
    "LOCKED_VARIABLES",
    "TenantflowJobConfiguration",
    "TenantflowProcessWorker",
    "base_job_template",
    "engine_command",
    "flow_heartbeat_seconds",
    "run_worker",
]

#: Job variables a flow run, a deployment or a work pool may not set on this worker.
LOCKED_VARIABLES = ("command", "env", "working_dir")
#: Prefect's engine loads the flow from this entrypoint, skipping the deployment's pull steps.
ENTRYPOINT_ENV = "PREFECT__FLOW_ENTRYPOINT"
#: Prefect's engine sends a flow run's heartbeat event this often (seconds, at least 30).
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


@lru_cache(maxsize=1)
def flow_heartbeat_seconds() -> int:
    """`FLOW_HEARTBEAT_S` of the worker's settings, read once."""
    return load_fault_settings().flow_heartbeat_s


def engine_command() -> str:
    """Prefect's engine, with the worker's own interpreter."""
    return command_to_string([get_sys_executable(), "-m", "prefect.engine"])


def _declared_entrypoint(deployment: DeploymentResponse | None) -> tuple[Path, str]:
    """The project folder and the entrypoint `prefect.yaml` declares for `deployment`.

    Raises:
        RuntimeError: no project folder, or a deployment the project does not declare.
    """
    folder = os.environ.get(PROJECT_DIR_ENV)
    if not folder:
        raise RuntimeError(
            f"{PROJECT_DIR_ENV} is not set in the worker's environment: the worker runs only "
            "the deployments that folder's prefect.yaml declares"
        )
    project = Path(folder).resolve()
    name = deployment.name if deployment is not None else None
    try:
        declared = declared_deployment(name, project) if name else None
    except DeployError as error:
        raise RuntimeError(str(error)) from None
    if declared is None:
        raise RuntimeError(
            f"deployment {name!r} is not declared in {project / 'prefect.yaml'}: this worker "
            "runs only the project's own deployments"
        )
    return project, declared.entrypoint


class TenantflowJobConfiguration(ProcessJobConfiguration):
    """A process job configuration whose command, environment and folder are the worker's."""

    _refusal: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _drop_locked_values(self) -> Self:
        # NOTE: whatever the template and the job variables rendered into these fields is
        # dropped as soon as the configuration exists; `prepare_for_flow_run` fills them.
        self.command = None
        self.env = {}
        self.working_dir = None
        return self

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        self.command = None
        self.env = {}
        self.working_dir = None
        # Prefect's own: the worker's settings, PREFECT__FLOW_RUN_ID and attribution
        # variables, on top of the worker's os.environ.
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        self.command = engine_command()
        # NOTE: an explicit command makes Prefect start exactly it, instead of resolving a
        # launcher from the flow run's workspace.
        self._command_configured = True
        try:
            project, entrypoint = _declared_entrypoint(deployment)
        except RuntimeError as refusal:
            self._refusal = str(refusal)
            return
        self.working_dir = project
        self.env[ENTRYPOINT_ENV] = entrypoint
        self.env[HEARTBEAT_ENV] = str(flow_heartbeat_seconds())


class TenantflowProcessWorker(ProcessWorker):
    """Prefect's process worker (type `process`) with `TenantflowJobConfiguration`."""

    job_configuration = TenantflowJobConfiguration
    _description = (
        "tenantflow's process worker: flow runs are Prefect's engine with the worker's own "
        "environment; job variables cannot change the command, environment or folder."
    )
    _display_name = "tenantflow process"

    @classmethod
    def __dispatch_key__(cls) -> str:
        # NOTE: Prefect keys its registry of worker classes by type; ours keeps the type
        # `process` (the pools' type) without replacing Prefect's own class there.
        return "tenantflow-process"

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        return base_job_template()

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        if isinstance(configuration, TenantflowJobConfiguration) and configuration._refusal:
            raise RuntimeError(configuration._refusal)
        locked = (
            isinstance(configuration, TenantflowJobConfiguration)
            and configuration.command == engine_command()
            and configuration.working_dir is not None
            and ENTRYPOINT_ENV in configuration.env
        )
        if not locked:
            raise RuntimeError(
                "refusing to start a flow run whose job configuration was not prepared by "
                "the tenantflow worker"
            )
        return await super().run(flow_run, configuration, task_status)


def base_job_template() -> dict[str, Any]:
    """The process pool's base job template: Prefect's, without the locked variables.

    `additionalProperties: false` makes the Prefect server refuse (422) a deployment or a
    flow run whose job variables name anything else, `command` and `env` included.
    """
    template = ProcessWorker.get_default_base_job_template()
    for key in LOCKED_VARIABLES:
        template["job_configuration"].pop(key, None)
        template["variables"]["properties"].pop(key, None)
    template["variables"]["additionalProperties"] = False
    return template


async def _serve(pool: str, name: str | None, limit: int | None) -> None:
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS
    from prefect.utilities.processutils import setup_signal_handlers_worker

    def say(*objects: Any, **_: Any) -> None:
        sys.stdout.write(" ".join(str(item) for item in objects) + "\n")
        sys.stdout.flush()

    # NOTE: as `prefect worker start`: the first SIGTERM becomes a SIGINT (stop polling,
    # cancel the worker's task), a second one a SIGKILL.
    setup_signal_handlers_worker(os.getpid(), "the tenantflow process worker", say)
    # NOTE: read now, so bad settings stop the worker before it takes a run.
    say(f"flow runs send a heartbeat every {flow_heartbeat_seconds()}s")
    worker = TenantflowProcessWorker(
        name=name,
        work_pool_name=pool,
        limit=limit,
        prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
        # NOTE: a typo never creates a stray pool with a default template.
        create_pool_if_not_found=False,
    )
    try:
        await worker.start(run_once=False, with_healthcheck=False, printer=say)
    except asyncio.CancelledError:
        say(f"Worker {worker.name!r} stopped!")


def run_worker(pool: str, *, name: str | None = None, limit: int | None = None) -> int:
    """Serve `pool` until SIGTERM or SIGINT; the exit code."""
    asyncio.run(_serve(pool, name, limit))
    return 0
