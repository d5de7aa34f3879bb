"""What the tenantflow docker and kubernetes workers lock, whatever the API says.

Prefect's docker and kubernetes workers render each flow run's job from the work pool's
base job template *as the API stores it*, with the deployment's and the run's job
variables and every block or variable reference resolved
(`BaseJobConfiguration.resolve_for_flow_run`); whoever reaches the API can change all
three, so could pick the image, the command, volumes, networks, the user or privileged
mode. And Prefect hands every flow-run container or Job the worker's whole set of Prefect
settings (`_base_environment`), `PREFECT_API_AUTH_STRING` included, as plain environment
variables, which `podman inspect` or the Job's manifest shows.

The tenantflow container workers (`tenantflow.docker_worker`, `tenantflow.kubernetes_worker`)
build each job from this module instead:

* the template is the worker's own packaged one (`deployments/<type>-base-job-template.json`
  of its project folder, `locked_template`), with the image of the worker's setting
  (`TENANTFLOW_FLOW_RUN_IMAGE`) baked in; the pool's template on the server is never read;
* the job variables of the deployment and the run are checked against that template's own
  schema (`check_job_variables`): a variable it does not have, or a value of the wrong
  type, fails the run (Crashed, naming it) before any container or Job exists; no block or
  Prefect variable reference is resolved (the template needs none);
* the command is `python -m tenantflow.container_run NAME` (`container_command`) for a
  deployment the worker's own `prefect.yaml` declares and that is not `migrate`'s
  (`declared_container_deployment`); the container checks the name again against the
  image's own `/app/prefect.yaml`;
* the environment is the run's ids and names (`PREFECT__*`), Prefect's API URL and the
  flow-run heartbeat (`container_environment`), never a secret; the secrets are passed by
  reference: the settings file mounted read-only at `/app/.env` (docker) or the Secret
  `tenantflow-worker` through `envFrom` (kubernetes), holding `container_settings()`
  (never `MIGRATION_DATABASE_URL`).

How to run them, and what each check answers: docs/operations.md, docs/security.md.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self
from uuid import UUID

from tenantflow.container_run import ContainerRunRefused, declared_container_entrypoint
from tenantflow.deployments import PoolType, base_job_template
from tenantflow.errors import TenantflowError
from tenantflow.flow_environment import BASIC_ENVIRONMENT, flow_run_environment
from tenantflow.project import PROJECT_DIR_ENV
from tenantflow.tripwire import install_tripwire
from tenantflow.worker import HEARTBEAT_ENV, DrainingWorker

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

__all__ = [
    "CONTAINER_ENVIRONMENT",
    "DEFAULT_IMAGE",
    "HEARTBEAT_ENV",
    "IMAGE_ENV",
    "RUN_USER",
    "SETTINGS_MOUNT",
    "ContainerWorker",
    "JobVariablesRefused",
    "LockedJobConfiguration",
    "check_job_variables",
    "container_command",
    "container_command_string",
    "container_environment",
    "container_settings",
    "declared_container_deployment",
    "flow_run_image",
    "job_variables",
    "locked_template",
    "render_locked",
    "run_objects",
    "settings_file_text",
]

#: The worker setting naming the flow runs' image (a run cannot choose it).
IMAGE_ENV = "TENANTFLOW_FLOW_RUN_IMAGE"
DEFAULT_IMAGE = "tenantflow-worker:latest"
#: The image's user (Dockerfile `USER`): every flow-run container runs as it.
RUN_USER = "10001:10001"
#: Where a docker flow run finds the worker's settings file (read-only).
SETTINGS_MOUNT = "/app/.env"
#: Settings a flow-run container gets as environment variables: none of them a secret.
CONTAINER_ENVIRONMENT = frozenset(
    {"PREFECT_API_URL", HEARTBEAT_ENV, "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"}
)
#: How long a cancelled run's container gets between SIGTERM and SIGKILL.
_CANCEL_GRACE_S = 30
#: Prefect's per-run variables (the run's id, its flow, deployment, pool and worker).
_PER_RUN_PREFIX = "PREFECT__"


class JobVariablesRefused(TenantflowError, RuntimeError):
    """A deployment or a flow run asked for job variables the worker's template lacks."""


def flow_run_image() -> str:
    """The flow runs' image: the worker's `TENANTFLOW_FLOW_RUN_IMAGE`."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


def _project_dir() -> Path:
    folder = os.environ.get(PROJECT_DIR_ENV)
    if not folder:
        raise RuntimeError(
            f"{PROJECT_DIR_ENV} is not set in the worker's environment: the worker runs only "
            "the deployments that folder's prefect.yaml declares"
        )
    return Path(folder).resolve()


def locked_template(pool_type: PoolType) -> dict[str, Any]:
    """The worker's own base job template, with the flow runs' image baked in."""
    return base_job_template(pool_type, _project_dir(), image=flow_run_image())


def job_variables(deployment: DeploymentResponse | None, flow_run: FlowRun) -> dict[str, Any]:
    """The run's job variables over its deployment's, merged as Prefect's workers merge them."""
    merged: dict[str, Any] = dict(getattr(deployment, "job_variables", None) or {})
    run = dict(flow_run.job_variables or {})
    if isinstance(merged.get("env"), dict) and isinstance(run.get("env"), dict):
        merged["env"] = {**merged["env"], **run.pop("env")}
    merged.update(run)
    return merged


async def run_objects(
    client: PrefectClient, flow_run: FlowRun, deployment: DeploymentResponse | None
) -> tuple[DeploymentResponse | None, Flow]:
    """The run's deployment (read when not given) and flow, as Prefect's workers read them."""
    if deployment is None and flow_run.deployment_id:
        deployment = await client.read_deployment(flow_run.deployment_id)
    return deployment, await client.read_flow(flow_run.flow_id)


def check_job_variables(values: Mapping[str, Any], template: Mapping[str, Any]) -> None:
    """Refuse job variables the template's own schema does not allow.

    Raises:
        JobVariablesRefused: a variable the schema does not have (so `image`, `command`,
            `volumes`, `networks`, `privileged`, `container_create_kwargs` ...), or a value
            the schema refuses; the message names them, never a value.
    """
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = template["variables"]
    unknown = sorted(set(values) - set(schema.get("properties", {})))
    if unknown:
        raise JobVariablesRefused(
            f"job variables {unknown} refused: the tenantflow worker's job template has no "
            "such variables (the image, command, environment, volumes, network, user and "
            "privileges are the worker's own)"
        )
    try:
        validate(
            dict(values),
            schema,
            raise_on_error=True,
            preprocess=True,
            ignore_required=True,
            allow_none_with_default=True,
        )
    except ValidationError as error:
        raise JobVariablesRefused(
            "job variables refused by the tenantflow worker's job template: "
            + str(error).splitlines()[0][:300]
        ) from None


def render_locked(template: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The template's job configuration with `values` (checked) and the defaults filled in.

    NOTE: `apply_values` only: no block document or Prefect variable reference is resolved
    (`from_template_and_values` would), so a job variable cannot pull a block's secret into
    a label or a name.
    """
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    variables = BaseJobConfiguration._get_base_config_defaults(
        template["variables"].get("properties", {})
    )
    variables.update(values)
    rendered: dict[str, Any] = apply_values(dict(template["job_configuration"]), variables)
    return rendered


def declared_container_deployment(deployment: DeploymentResponse | None) -> str:
    """The name of the run's deployment, if the worker's own project lets it run in a container.

    Raises:
        RuntimeError: no deployment, one the project does not declare, or `migrate`'s.
    """
    if deployment is None:
        raise RuntimeError(
            "a flow run without a deployment: the tenantflow worker runs only the project's "
            "own deployments"
        )
    try:
        declared_container_entrypoint(deployment.name, _project_dir())
    except ContainerRunRefused as refusal:
        raise RuntimeError(str(refusal)) from None
    return deployment.name


def container_command(deployment: str) -> list[str]:
    """The flow-run container's command: the image's interpreter on `tenantflow.container_run`."""
    return ["python", "-m", "tenantflow.container_run", deployment]


def container_command_string(deployment: str) -> str:
    """`container_command` as one shell-quoted string (Prefect's `command` field)."""
    return shlex.join(container_command(deployment))


def container_environment(prepared: Mapping[str, str | None], heartbeat_s: int) -> dict[str, str]:
    """A flow-run container's environment: the run's own variables and no secret."""
    env = {
        key: value
        for key, value in prepared.items()
        if value is not None and (key.startswith(_PER_RUN_PREFIX) or key in CONTAINER_ENVIRONMENT)
    }
    env[HEARTBEAT_ENV] = str(heartbeat_s)
    return env


def container_settings(worker: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a flow-run container reads from its settings file or Secret: the worker's
    tenantflow settings and Prefect client settings (`flow_run_environment`), never the
    schema owner's login, nor the machine's basics (PATH, HOME: the image's own)."""
    env = flow_run_environment({}, worker, migration=False)
    return {
        key: value
        for key, value in env.items()
        if key not in BASIC_ENVIRONMENT
        and not key.startswith(("LC_", _PER_RUN_PREFIX))
        and key != HEARTBEAT_ENV
    }


def settings_file_text(settings: Mapping[str, str]) -> str:
    """`settings` as a `.env` file (single-quoted values, as python-dotenv reads them).

    Raises:
        ValueError: a value on several lines (the name only in the message).
    """
    lines = []
    for key, value in sorted(settings.items()):
        if "\n" in value or "\r" in value:
            raise ValueError(f"setting {key} spans several lines: not in a settings file")
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        lines.append(f"{key}='{quoted}'\n")
    return "".join(lines)


class LockedJobConfiguration:
    """The job of a flow run from the worker's own template, never the pool's as the API
    stores it. Mixed into a container worker's job configuration class, before Prefect's:
    `class C(LockedJobConfiguration, DockerWorkerJobConfiguration)`."""

    #: The template it renders: `deployments/<pool_type>-base-job-template.json`.
    pool_type: ClassVar[PoolType]

    if TYPE_CHECKING:

        def __init__(self, **values: Any) -> None: ...

        def prepare_for_flow_run(
            self,
            flow_run: FlowRun,
            deployment: DeploymentResponse | None = None,
            flow: Flow | None = None,
            work_pool: WorkPool | None = None,
            worker_name: str | None = None,
            worker_id: UUID | None = None,
        ) -> None: ...

    @classmethod
    async def resolve_for_flow_run(
        cls,
        flow_run: FlowRun,
        *,
        client: PrefectClient,
        work_pool: WorkPool,
        worker_name: str,
        worker_id: UUID | None = None,
        deployment: DeploymentResponse | None = None,
    ) -> Self:
        """Prefect's worker calls this for each run it submits (and cancels)."""
        deployment, flow = await run_objects(client, flow_run, deployment)
        return cls.render(
            flow_run,
            deployment,
            flow,
            work_pool=work_pool,
            worker_name=worker_name,
            worker_id=worker_id,
        )

    @classmethod
    def render(
        cls,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None,
        flow: Flow | None,
        *,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> Self:
        """The prepared job configuration of `flow_run`, from the worker's template and the
        run's job variables, checked against that template's schema.

        Raises:
            JobVariablesRefused: a job variable the template lacks or refuses.
            RuntimeError: a deployment the project does not declare, or `migrate`'s
                (`prepare_for_flow_run`).
        """
        template = locked_template(cls.pool_type)
        values = job_variables(deployment, flow_run)
        check_job_variables(values, template)
        configuration = cls(**render_locked(template, values))
        configuration.prepare_for_flow_run(
            flow_run,
            deployment=deployment,
            flow=flow,
            work_pool=work_pool,
            worker_name=worker_name,
            worker_id=worker_id,
        )
        return configuration


class ContainerWorker(DrainingWorker):
    """What the tenantflow docker and kubernetes workers share, mixed in before Prefect's
    worker class: the type's own template, a registry key of its own, the tripwire, no
    ad-hoc runs, and runs cancelled through the API stopped even once they have started.
    Their flow-run containers outlive the worker (`in_flight` stays empty: a stopping
    worker leaves them running, each reports its own end)."""

    pool_type: ClassVar[PoolType]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The runs whose container or Job this worker watches now.
        self._running: set[UUID] = set()

    @classmethod
    def __dispatch_key__(cls) -> str:
        # NOTE: the pools' type stays Prefect's; Prefect's own class keeps its registry key.
        return f"tenantflow-{cls.pool_type}"

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        return locked_template(cls.pool_type)

    async def setup(self) -> None:
        install_tripwire()
        await super().setup()  # type: ignore[misc]

    @contextlib.contextmanager
    def running(self, flow_run_id: UUID) -> Iterator[None]:
        """Around a run's `run()`: while it runs, a cancellation through the API stops it."""
        self._running.add(flow_run_id)
        try:
            yield
        finally:
            self._running.discard(flow_run_id)
            observer = getattr(self, "_cancelling_observer", None)
            if observer is not None:
                observer.remove_in_flight_flow_run_id(flow_run_id)

    async def _submit_run(self, flow_run: FlowRun) -> None:
        await super()._submit_run(flow_run)  # type: ignore[misc]
        # NOTE: Prefect's worker stops watching a run for cancellation once it has
        # started; this one watches it until its container or Job ends (`running`).
        observer = getattr(self, "_cancelling_observer", None)
        if observer is not None and flow_run.id in self._running:
            observer.add_in_flight_flow_run_id(flow_run.id)

    async def _setup_cancellation_observer(self) -> None:
        # NOTE: Prefect observes cancellations only with PREFECT_WORKER_ENABLE_CANCELLATION
        # (off by default); without it a run cancelled through the API would go on in its
        # container (`_cancel_run`).
        from prefect.settings import PREFECT_WORKER_ENABLE_CANCELLATION, temporary_settings

        with temporary_settings(updates={PREFECT_WORKER_ENABLE_CANCELLATION: True}):
            await super()._setup_cancellation_observer()  # type: ignore[misc]

    async def _cancel_run(self, flow_run_id: UUID) -> None:
        """Stop the container or Job of a run cancelled through the API, then mark it
        Cancelled.

        NOTE: Prefect's worker stops only runs that never started: a started one is left
        to the Runner of `prefect flow-run execute` in its container, which a tenantflow
        container never runs (it loads the flow from the API). The engine in the container
        ends on the stop's SIGTERM (its crash hooks, the token redaction, run there).
        """
        import copy

        from prefect.exceptions import InfrastructureNotFound, ObjectNotFound

        # NOTE: the Prefect worker this is mixed into (its attributes: BaseWorker's).
        worker: Any = self

        try:
            flow_run: FlowRun = await worker.client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return
        if flow_run.start_time is None or not flow_run.infrastructure_pid:
            await super()._cancel_run(flow_run_id)  # type: ignore[misc]
            return
        if flow_run.state is None or not flow_run.state.is_cancelling():
            return
        configuration = await worker.job_configuration.resolve_for_flow_run(
            flow_run,
            client=worker.client,
            work_pool=copy.deepcopy(worker.work_pool),
            worker_name=worker.name,
            worker_id=worker.backend_id,
        )
        with contextlib.suppress(InfrastructureNotFound):
            await worker.kill_infrastructure(
                infrastructure_pid=flow_run.infrastructure_pid,
                configuration=configuration,
                grace_seconds=_CANCEL_GRACE_S,
            )
        await worker._mark_flow_run_as_cancelled(
            flow_run,
            state_updates={"message": "Flow run cancelled: its container was stopped."},
        )
        worker.get_flow_run_logger(flow_run).info(f"Cancelled running flow run {flow_run.id}")

    async def _submit_adhoc_run(self, *args: Any, **kwargs: Any) -> None:
        # NOTE: `flow.submit_to_work_pool` ships the caller's code in a bundle and runs it
        # with a command of its own: nothing a tenantflow worker runs.
        raise RuntimeError("a tenantflow worker runs only the project's own deployments")
