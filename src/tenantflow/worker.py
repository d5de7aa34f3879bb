"""The tenantflow process worker: Prefect's process worker, with what runs locked.

Whoever can reach the Prefect API can create flow runs with any job variables, and
Prefect's process worker takes `command`, `env` and `working_dir` from them (and from the
work pool's template and the deployment): a run could start any program with the
worker's credentials, or change the worker's settings (say `SUPABASE_JWT_SECRET`). This
worker ignores all three, for every flow run, whoever set them.

Nor does it run what a deployment says through the API: deployments, their entrypoints
and their pull steps can be created or changed by whoever reaches the API, and pull steps
are code (`run_shell_script`). The worker looks the run's deployment up by name in its
own copy of the project's `prefect.yaml` (in `TENANTFLOW_PROJECT_DIR`) and:

* refuses, before any process starts (the run ends Crashed saying so), a deployment the
  project does not declare, or one declared for another work pool than the worker's (so
  a tenant deployment re-pointed at `tenantflow-migrate` never reaches the worker that
  holds the owner's login);
* starts `python -m tenantflow.flow_run ENTRYPOINT` (`tenantflow.flow_run`) on the
  absolute entrypoint declared there, in a fresh temporary folder, so no pull step runs
  and nothing is imported from the API;
* loads the flow for its own on_crashed and on_cancellation hooks (the token redaction)
  from that same declared entrypoint: Prefect's worker would load it from the deployment
  as the API stores it (`load_flow_from_flow_run`: pull steps, then the entrypoint), in
  the worker process;
* gives the flow-run process an allow-listed environment (`flow_run_environment`), not
  the worker's whole `os.environ`: basics (PATH, HOME, locale, TLS and proxies), Prefect's
  client settings and per-run variables, and tenantflow's settings; the schema owner's
  login (`MIGRATION_DATABASE_URL`) only to runs of deployments declared for
  `tenantflow-migrate`.

The tripwire (`tenantflow.tripwire`), installed when the worker starts, makes every other
Prefect path that would load a flow or run steps from the API fail loudly instead.

The process pool's base job template (`base_job_template()`) has no `command`, `env` or
`working_dir` variables and refuses unknown ones (`additionalProperties: false`), so the
Prefect server already answers 422 to a run that asks for them; the worker holds even when
the pool's template has been changed through the API.

Every flow run it starts sends Prefect's flow-run heartbeat every `FLOW_HEARTBEAT_S`
seconds (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` in the run's environment): the bootstrap's
zombie automation marks Crashed a run whose heartbeats stop, when its process or machine
dies with the worker.

`tenantflow worker --pool NAME` starts it, as `prefect worker start` would.

What the worker locks, and why (with every code path of Prefect's it closes):
docs/security.md and docs/flows.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast
from uuid import UUID

import anyio
import anyio.abc
from prefect.runner._flow_run_executor import FlowRunExecutionResult, FlowRunExecutorContext
from prefect.runner._process_manager import ProcessHandle
from prefect.utilities.processutils import (
    command_from_string,
    command_to_string,
    consume_process_output,
    get_sys_executable,
    run_process,
    sanitize_subprocess_env,
)
from prefect.workers.base import BaseJobConfiguration, BaseWorker
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult
from pydantic import PrivateAttr, model_validator

from tenantflow.deployments import MIGRATE_POOL
from tenantflow.errors import TenantflowError
from tenantflow.flow_environment import BASIC_ENVIRONMENT, MIGRATION_ENV, flow_run_environment
from tenantflow.flow_run import WarmRequest, share_prefect_tls_context
from tenantflow.housekeeping import run_housekeeping
from tenantflow.project import PROJECT_DIR_ENV, DeployError, declared_deployment, deployment_names
from tenantflow.settings import SettingsError, load_fault_settings, load_settings
from tenantflow.tripwire import install_tripwire
from tenantflow.wake import PoolWorker, wake_on_events
from tenantflow.warm_start import WarmProcess, WarmStarts, base_environment, per_run_variables

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.flows import Flow
    from prefect.runner._control_channel import ControlChannel

__all__ = [
    "BASIC_ENVIRONMENT",
    "ENTRYPOINT_ENV",
    "HEARTBEAT_ENV",
    "LOCKED_VARIABLES",
    "MIGRATION_ENV",
    "DeclaredRun",
    "DrainingWorker",
    "TenantflowJobConfiguration",
    "TenantflowProcessWorker",
    "base_job_template",
    "check_worker_settings",
    "declared_run",
    "engine_command",
    "flow_heartbeat_seconds",
    "flow_run_environment",
    "run_worker",
]

#: Job variables a flow run, a deployment or a work pool may not set on this worker.
LOCKED_VARIABLES = ("command", "env", "working_dir")
#: The declared entrypoint, also in the flow run's environment (as Prefect's engine names it).
ENTRYPOINT_ENV = "PREFECT__FLOW_ENTRYPOINT"
#: Prefect's engine sends a flow run's heartbeat event this often (seconds, at least 30).
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


@lru_cache(maxsize=1)
def flow_heartbeat_seconds() -> int:
    """`FLOW_HEARTBEAT_S` of the worker's settings, read once."""
    return load_fault_settings().flow_heartbeat_s


def engine_command(entrypoint: str) -> str:
    """The flow-run process: `tenantflow.flow_run` on `entrypoint`, the worker's interpreter."""
    return command_to_string([get_sys_executable(), "-m", "tenantflow.flow_run", entrypoint])


@dataclass(frozen=True)
class DeclaredRun:
    """What `prefect.yaml` declares for a flow run's deployment, for this worker's pool."""

    deployment: str
    project: Path
    #: `<absolute path>:<function>`, under the project folder.
    entrypoint: str
    work_pool: str

    @property
    def holds_migration_login(self) -> bool:
        return self.work_pool == MIGRATE_POOL

    async def load_flow(self, flow_run: FlowRun) -> Flow[..., Any]:
        """The declared flow (for the worker's on_crashed and on_cancellation hooks).

        NOTE: the flow's own file, imported in the worker as Prefect would import the
        deployment's; the API's entrypoint, path and pull steps are never read.
        """
        from prefect.flows import load_flow_from_entrypoint

        return await anyio.to_thread.run_sync(
            lambda: load_flow_from_entrypoint(self.entrypoint, use_placeholder_flow=False)
        )


def declared_run(deployment: DeploymentResponse | None, worker_pool: str | None) -> DeclaredRun:
    """The declared deployment of a flow run, if this worker's pool may run it.

    Raises:
        RuntimeError: no project folder, a deployment the project does not declare, one
            declared for another work pool, or an entrypoint outside the project folder.
    """
    return declared_run_named(deployment.name if deployment is not None else None, worker_pool)


def declared_run_named(name: str | None, worker_pool: str | None) -> DeclaredRun:
    """`declared_run` for a deployment's name (None: a run of no deployment)."""
    folder = os.environ.get(PROJECT_DIR_ENV)
    if not folder:
        raise RuntimeError(
            f"{PROJECT_DIR_ENV} is not set in the worker's environment: the worker runs only "
            "the deployments that folder's prefect.yaml declares"
        )
    project = Path(folder).resolve()
    try:
        declared = declared_deployment(name, project) if name else None
    except DeployError as error:
        raise RuntimeError(str(error)) from None
    if declared is None:
        raise RuntimeError(
            f"deployment {name!r} is not declared in {project / 'prefect.yaml'}: this worker "
            "runs only the project's own deployments"
        )
    if not worker_pool or declared.work_pool != worker_pool:
        raise RuntimeError(
            f"deployment {name!r} is declared for work pool {declared.work_pool!r} in "
            f"{project / 'prefect.yaml'}, not for this worker's pool {worker_pool!r}: a "
            "worker runs only the deployments declared for its own pool"
        )
    path, colon, function = declared.entrypoint.rpartition(":")
    script = (project / path).resolve()
    if not colon or not function or project not in script.parents or not script.is_file():
        raise RuntimeError(
            f"deployment {name!r}: its declared entrypoint {declared.entrypoint!r} is not a "
            f"file of {project}"
        )
    return DeclaredRun(name or "", project, f"{script}:{function}", worker_pool)


class TenantflowJobConfiguration(ProcessJobConfiguration):
    """A process job configuration whose command, environment and folder are the worker's."""

    _refusal: str | None = PrivateAttr(default=None)
    _declared: DeclaredRun | None = PrivateAttr(default=None)

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
        self._declared = None
        # NOTE: the base class's, not ProcessJobConfiguration's: that one merges the
        # worker's whole os.environ into the run's. This gives Prefect's client settings,
        # PREFECT__FLOW_RUN_ID and the attribution variables.
        BaseJobConfiguration.prepare_for_flow_run(
            self, flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        prefect = dict(self.env)
        self.env = {}
        self._command_configured = True
        try:
            declared = declared_run(deployment, work_pool.name if work_pool else None)
        except RuntimeError as refusal:
            self._refusal = str(refusal)
            self.command = None
            return
        self._declared = declared
        self.command = engine_command(declared.entrypoint)
        self.env = {
            **run_environment(prefect, migration=declared.holds_migration_login),
            ENTRYPOINT_ENV: declared.entrypoint,
        }


def run_environment(prefect: Mapping[str, str | None], *, migration: bool) -> dict[str, str]:
    """A flow run's environment but its entrypoint: the allow-listed environment
    (`flow_run_environment`) of what Prefect prepared, and the heartbeat."""
    return {
        **flow_run_environment(prefect, migration=migration),
        HEARTBEAT_ENV: str(flow_heartbeat_seconds()),
    }


def declared_entrypoints(pool: str) -> list[str]:
    """The absolute entrypoints of the deployments declared for `pool` (for warm starts)."""
    folder = os.environ.get(PROJECT_DIR_ENV)
    if not folder:
        return []
    project = Path(folder).resolve()
    try:
        names = deployment_names(project)
    except DeployError:
        return []  # each run is refused, saying why (`declared_run`): nothing to start ahead
    entrypoints = []
    for name in names:
        with contextlib.suppress(RuntimeError):
            declared = declared_run_named(name, pool)
            entrypoints.append(declared.entrypoint)
    return entrypoints


class _EngineStarter:
    """Starts the flow-run process with exactly the configuration's environment.

    NOTE: Prefect's `EngineCommandStarter` would add the worker's whole `os.environ`; this
    adds only the per-attempt variables Prefect's runner needs (the run's id, the control
    channel that carries cancellation) and turns off the engine's own cancellation and
    crash hooks, which the worker runs instead (as Prefect's starter does).
    """

    def __init__(
        self,
        *,
        command: str,
        cwd: Path,
        env: Mapping[str, str],
        stream_output: bool,
        control_channel: ControlChannel | None,
        entrypoint: str,
        warm: WarmStarts | None = None,
    ) -> None:
        self._command = command
        self._cwd = cwd
        self._env = dict(env)
        self._stream_output = stream_output
        self._control_channel = control_channel
        self._entrypoint = entrypoint
        self._warm = warm

    async def start(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        env: dict[str, str | None] = {
            **self._env,
            "PREFECT__FLOW_RUN_ID": str(flow_run.id),
            "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
        }
        registered = False
        if self._control_channel is not None:
            try:
                port, token = self._control_channel.register(flow_run.id)
            except RuntimeError:
                pass  # no loopback listener: Prefect falls back to a plain kill
            else:
                env["PREFECT__CONTROL_PORT"] = str(port)
                env["PREFECT__CONTROL_TOKEN"] = token
                registered = True
        handed_off = False

        def handle(process: anyio.abc.Process) -> ProcessHandle:
            nonlocal handed_off
            handed_off = True
            return ProcessHandle(process)

        try:
            process_env = sanitize_subprocess_env(env)
            warm = (
                await self._warm.take(process_env, self._entrypoint)
                if self._warm is not None
                else None
            )
            if warm is not None:
                try:
                    await warm.hand_off(
                        WarmRequest(self._entrypoint, per_run_variables(process_env))
                    )
                except OSError:
                    warm.remove_folder()  # it died just now: the run starts cold
                    warm = None
            if warm is not None:
                try:
                    await self._run_warm(warm, task_status, handle)
                finally:
                    warm.remove_folder()
                return
            await run_process(
                command=command_from_string(self._command),
                stream_output=self._stream_output,
                task_status=task_status,
                task_status_handler=handle,
                env=process_env,
                cwd=self._cwd,
            )
        except BaseException:
            if registered and not handed_off and self._control_channel is not None:
                self._control_channel.unregister(flow_run.id)
            raise

    async def _run_warm(
        self,
        warm: WarmProcess,
        task_status: anyio.abc.TaskStatus[ProcessHandle],
        handle: Callable[[anyio.abc.Process], ProcessHandle],
    ) -> None:
        """The run in a process started ahead, once handed its run: as `run_process` does."""
        process = warm.process
        try:
            async with process:
                task_status.started(handle(process))
                if self._stream_output:
                    await consume_process_output(
                        process, stdout_sink=sys.stdout, stderr_sink=sys.stderr
                    )
                await process.wait()
        finally:
            # NOTE: as Prefect's `open_process`: a cancelled wait (the worker stopping)
            # leaves no process behind.
            with contextlib.suppress(ProcessLookupError, OSError):
                if process.returncode is None:
                    process.terminate()


class DrainingWorker:
    """What `_Shutdown` needs of a worker, mixed into each tenantflow worker class.

    Base it before Prefect's worker class: `class W(DrainingWorker, ProcessWorker)`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Set when the worker is told to stop: it takes no new flow run from then on.
        self.draining = False
        #: The flow runs whose process is running now: id -> (name, pid).
        self.in_flight: dict[UUID, tuple[str, int]] = {}
        #: Set while no flow run is in flight.
        self.idle = asyncio.Event()
        self.idle.set()
        # NOTE: the regular poll and the polls events start (tenantflow.wake) take turns.
        self._polling = asyncio.Lock()

    async def get_and_submit_flow_runs(self) -> list[FlowRun]:
        # NOTE: a stopping worker keeps its loops (heartbeats, the runs in flight reporting
        # their ends) but polls for no new run.
        if self.draining:
            return []
        async with self._polling:
            if self.draining:
                return []
            submitted: list[FlowRun] = await super().get_and_submit_flow_runs()  # type: ignore[misc]
        return submitted


class TenantflowProcessWorker(DrainingWorker, ProcessWorker):
    """Prefect's process worker (type `process`) that runs only declared code."""

    job_configuration = TenantflowJobConfiguration
    _description = (
        "tenantflow's process worker: flow runs are Prefect's engine on the entrypoint the "
        "project declares, with an allow-listed environment; job variables and deployments "
        "changed through the API cannot change the command, code, environment or folder."
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

    #: The process started ahead for the next run (None: warm starts are off).
    warm: WarmStarts | None = None

    async def setup(self) -> None:
        await super().setup()
        pool = self._work_pool_name
        if not load_fault_settings().worker_warm_start:
            return
        entrypoints = declared_entrypoints(pool)
        if not entrypoints:
            return
        self.warm = WarmStarts(entrypoints, say=self._logger.warning)
        prefect = BaseJobConfiguration._base_environment()
        await self.warm.prime(
            base_environment(run_environment(prefect, migration=pool == MIGRATE_POOL))
        )

    async def teardown(self, *exc_info: Any) -> None:
        if self.warm is not None:
            await self.warm.aclose()
        await super().teardown(*exc_info)

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        """Start the flow run's process and wait for it, as Prefect's process worker does,
        but on the declared entrypoint, with the declared flow for the hooks.

        NOTE: a re-implementation, not `super().run()`: Prefect's hands the executor
        `resolve_flow=load_flow_from_flow_run`, which runs the deployment's pull steps and
        imports its entrypoint, as the API stores them, to run crash and cancellation hooks.
        """
        if isinstance(configuration, TenantflowJobConfiguration) and configuration._refusal:
            raise RuntimeError(configuration._refusal)
        declared = (
            configuration._declared
            if isinstance(configuration, TenantflowJobConfiguration)
            else None
        )
        if (
            declared is None
            or configuration.command != engine_command(declared.entrypoint)
            or configuration.env.get(ENTRYPOINT_ENV) != declared.entrypoint
        ):
            raise RuntimeError(
                "refusing to start a flow run whose job configuration was not prepared by "
                "the tenantflow worker"
            )
        status = task_status or anyio.TASK_STATUS_IGNORED
        env = {key: value for key, value in configuration.env.items() if value is not None}
        execution: FlowRunExecutionResult | None = None
        # NOTE: a folder of the run's own, not the project's: nothing there (a `.env`, a
        # `prefect.toml`) configures the run; the flow is found by its absolute path.
        with (
            tempfile.TemporaryDirectory(prefix="tenantflow-run-") as folder,
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", DeprecationWarning)
            async with FlowRunExecutorContext() as ctx:
                executor = ctx.create_executor(
                    flow_run,
                    _EngineStarter(
                        command=engine_command(declared.entrypoint),
                        cwd=Path(folder),
                        env=env,
                        stream_output=configuration.stream_output,
                        control_channel=ctx.control_channel,
                        entrypoint=declared.entrypoint,
                        warm=self.warm,
                    ),
                    # NOTE: also wired into the context's cancellation manager, for the
                    # on_cancellation hooks of a Pending or Running run.
                    resolve_flow=declared.load_flow,
                    propose_submitting=False,
                )

                async def execute(
                    *, task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED
                ) -> None:
                    nonlocal execution
                    execution = await executor.submit(task_status=task_status)

                try:
                    async with anyio.create_task_group() as group:
                        handle: ProcessHandle = await group.start(execute)
                        if handle.pid is None:
                            raise RuntimeError("Flow run process has no PID")
                        self.in_flight[flow_run.id] = (flow_run.name, handle.pid)
                        self.idle.clear()
                        status.started(handle.pid)
                finally:
                    self.in_flight.pop(flow_run.id, None)
                    if not self.in_flight:
                        self.idle.set()
        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        return ProcessWorkerResult(
            status_code=execution.status_code, identifier=str(execution.handle.pid)
        )


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


def check_worker_settings(pool: str) -> None:
    """Refuse to serve `pool` with settings its flow runs could not work with.

    The worker itself needs only Prefect's settings, but it hands its own to every flow run
    (`flow_run_environment`): a missing or malformed one would fail each run it takes, one
    by one, instead of the worker, once, at start.

    Raises:
        SettingsError: PREFECT_API_URL unset; a tenantflow setting missing or invalid
            (`load_settings`: DATABASE_URL, SUPABASE_URL, SUPABASE_ANON_KEY, a malformed
            SEAL_PRIVATE_KEYS ...); SEAL_PRIVATE_KEYS unset (no run started by a user could
            open its sealed token); MIGRATION_DATABASE_URL unset on `tenantflow-migrate`.
            The message names the settings, never a value.
    """
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise SettingsError(
            "PREFECT_API_URL is not set: the worker needs the Prefect API's URL (and "
            "PREFECT_API_AUTH_STRING where the server asks for basic auth)"
        )
    settings = load_settings()
    if settings.seal_private_keys is None:
        raise SettingsError(
            "SEAL_PRIVATE_KEYS is not set: the worker's flow runs could open no sealed access "
            "token (`tenantflow seal-key generate` makes the key pair)"
        )
    if pool == MIGRATE_POOL:
        settings.migration_url()


class WorkerPoolMissing(TenantflowError, RuntimeError):
    """The pool the worker was asked to serve does not exist on the Prefect server."""


async def _check_pool(pool: str) -> None:
    """Read the pool once, so a refused API auth string or a missing pool stops the worker
    in one line before it starts anything (an HTTP 401 names PREFECT_API_AUTH_STRING)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            raise WorkerPoolMissing(
                f"work pool {pool!r} does not exist on the Prefect server: "
                "`tenantflow deploy --bootstrap-only` creates the project's pools"
            ) from None


#: How long runs stopped with SIGTERM get to report their end before they are killed.
_TERMINATE_WAIT_S = 8.0


class _Shutdown:
    """The worker's stop, on the first SIGTERM or SIGINT (a second one: at once).

    It takes no new flow run (`draining`), lets the runs in flight go on for up to
    WORKER_DRAIN_S, then sends each one still running SIGTERM: Prefect's engine in the
    run's process marks it Crashed ("aborted by a termination signal") and leaves its
    `tenantflow-db` slots on the way out. One that has not exited after
    `_TERMINATE_WAIT_S` is killed; its run is then left to the zombie automation. Each
    step is said in the worker's log, run by run.

    NOTE: instead of Prefect's `setup_signal_handlers_worker` (SIGTERM -> SIGINT, which
    cancels the worker and its runs' tasks at once): in a container the runs' processes die
    with PID 1, unreported, and would stay Running until the zombie automation's window
    passed, their slots held until their lease expired.
    """

    def __init__(
        self,
        worker: DrainingWorker,
        main: asyncio.Task[Any],
        say: Callable[..., None],
        drain_s: float,
    ) -> None:
        self.worker = worker
        self.main = main
        self.say = say
        self.drain_s = drain_s
        self.task: asyncio.Task[None] | None = None

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.signalled, signum)

    def signalled(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.task is not None:
            self.say(f"{name} again: stopping now; flow runs still in flight die with the worker")
            self.main.cancel()
            return
        self.worker.draining = True
        self.task = asyncio.create_task(self.stop(name), name="shutdown")

    def _runs(self) -> str:
        return ", ".join(
            f"{name!r} ({run_id})" for run_id, (name, _) in self.worker.in_flight.items()
        )

    async def _wait_for_runs(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.worker.idle.wait(), seconds)

    async def stop(self, name: str) -> None:
        if not self.worker.in_flight:
            self.say(f"{name}: stopping; taking no new flow runs, none in flight")
        else:
            self.say(
                f"{name}: stopping; taking no new flow runs; in flight: {self._runs()}; "
                f"they get {self.drain_s:g}s (WORKER_DRAIN_S) to finish"
            )
            await self._wait_for_runs(self.drain_s)
        stopped = dict(self.worker.in_flight)
        for run_id, (run_name, pid) in stopped.items():
            self.say(
                f"flow run {run_name!r} ({run_id}) still running: sending it SIGTERM; it ends "
                "Crashed and gives its database slots back; start it again"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        await self._wait_for_runs(_TERMINATE_WAIT_S)
        for run_id, (run_name, pid) in dict(self.worker.in_flight).items():
            self.say(
                f"flow run {run_name!r} ({run_id}) did not stop within {_TERMINATE_WAIT_S:g}s: "
                "killed; the zombie automation marks it Crashed"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for run_id in stopped.keys() - self.worker.in_flight.keys():
            self.say(f"flow run {stopped[run_id][0]!r} ({run_id}) stopped")
        self.main.cancel()


async def _serve(
    pool: str,
    name: str | None,
    limit: int | None,
    worker_class: type[BaseWorker[Any, Any, Any]] = TenantflowProcessWorker,
) -> None:
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS

    def say(*objects: Any, **_: Any) -> None:
        sys.stdout.write(" ".join(str(item) for item in objects) + "\n")
        sys.stdout.flush()

    # NOTE: before anything of Prefect's could load a flow: from here on, every path that
    # would take code from the API raises instead (tenantflow.tripwire).
    install_tripwire()
    # NOTE: read now, so bad settings stop the worker before it takes a run.
    check_worker_settings(pool)
    faults = load_fault_settings()
    await _check_pool(pool)
    say(f"flow runs send a heartbeat every {flow_heartbeat_seconds()}s")
    worker = worker_class(
        name=name,
        work_pool_name=pool,
        limit=limit,
        prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
        # NOTE: a typo never creates a stray pool with a default template.
        create_pool_if_not_found=False,
    )
    main = asyncio.current_task()
    assert main is not None  # noqa: S101 (asyncio.run's task)
    # NOTE: every tenantflow worker class is a DrainingWorker (`run_worker`'s callers).
    _Shutdown(cast(DrainingWorker, worker), main, say, faults.worker_drain_s).install()
    # NOTE: beside the worker, in its process (no API call can stop it): sealed values
    # removed from ended runs, plain tokens from any run, squatted or missed schedule
    # slots and a full limit nobody holds reported (tenantflow.housekeeping).
    housekeeping = asyncio.create_task(run_housekeeping(pool=pool), name="housekeeping")
    housekeeping.add_done_callback(partial(_housekeeping_ended, say))
    # NOTE: a run created now starts now, not at the next poll (tenantflow.wake).
    wake = (
        asyncio.create_task(wake_on_events(cast(PoolWorker, worker), say), name="wake-on-events")
        if faults.worker_wake_on_events
        else None
    )
    try:
        await worker.start(run_once=False, with_healthcheck=False, printer=say)
    except asyncio.CancelledError:
        say(f"Worker {worker.name!r} stopped!")
    finally:
        if wake is not None:
            wake.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await wake
        housekeeping.cancel()
        # NOTE: a housekeeping that ended on an error has said so (`_housekeeping_ended`);
        # it never changes how the worker itself ends.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await housekeeping


def _housekeeping_ended(say: Callable[..., None], task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        error = task.exception()
        say(f"housekeeping stopped: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


def run_worker(
    pool: str,
    *,
    name: str | None = None,
    limit: int | None = None,
    worker_class: type[BaseWorker[Any, Any, Any]] = TenantflowProcessWorker,
) -> int:
    """Serve `pool` until SIGTERM or SIGINT with `worker_class` (default the process
    worker; `tenantflow.docker_worker` for the docker pool); the exit code."""
    # NOTE: Prefect's worker makes an API client for every run it starts (its executor
    # context), each parsing the whole CA bundle for its TLS context (about 65 ms here,
    # before the run's process is started): one verified context per CA file serves all.
    share_prefect_tls_context()
    asyncio.run(_serve(pool, name, limit, worker_class))
    return 0
