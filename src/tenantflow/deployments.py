"""What a Prefect installation needs beside `prefect.yaml`.

* `bootstrap()` creates or updates, idempotently, the work pools (always with
  `tenantflow-migrate`, the process pool of `migrate` alone), the global
  concurrency limit that caps tenant transactions (`tenantflow-db`) and the automations
  of `tenantflow.automations` (zombie runs marked Crashed; operator alerts about
  `nightly-rollup`). Run it before
  `prefect deploy` and before starting workers: a worker does not create its pool.
* `deploy()` runs `prefect --no-prompt deploy` over `prefect.yaml` in the project folder.
* `set_project_directory()` is the pull step of every deployment, for Prefect's own docker
  and kubernetes workers: it moves a flow run into the folder that holds `flows/`, named
  at run time by `TENANTFLOW_PROJECT_DIR` (the image sets `/app`). The tenantflow process
  worker runs no pull step (`tenantflow.worker`).

NOTE: Prefect resolves `{{ $VAR }}` placeholders in pull steps when the deployment is
*created*, from the deployer's environment, so `set_working_directory` with an
environment placeholder would bake the deployer's folder into the deployment. A step
that reads the variable when the run starts works for every worker alike.

Deploying on process, docker and kubernetes pools: docs/operations.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from tenantflow.automations import Alerts, Outcome, ensure_automations
from tenantflow.errors import TenantflowError
from tenantflow.project import (
    PROJECT_DIR_ENV,
    DeployError,
    declared_deployment,
    deployment_names,
)

__all__ = [
    "MIGRATE_POOL",
    "WORK_POOLS",
    "BootstrapError",
    "BootstrapResult",
    "DeployResult",
    "PoolType",
    "abootstrap",
    "base_job_template",
    "bootstrap",
    "deploy",
    "set_project_directory",
]

log = logging.getLogger("tenantflow.deployments")

PoolType = Literal["process", "docker", "kubernetes"]

#: The tenant deployments' pool, by type.
WORK_POOLS: dict[PoolType, str] = {
    "process": "tenantflow-process",
    "docker": "tenantflow-docker",
    "kubernetes": "tenantflow-kubernetes",
}
#: `migrate`'s own process pool: its worker alone holds MIGRATION_DATABASE_URL.
MIGRATE_POOL = "tenantflow-migrate"

_POOL_DESCRIPTIONS: dict[str, str] = {
    WORK_POOLS["process"]: (
        "tenantflow flow runs as subprocesses of a process worker (the local stack, or the "
        "tenantflow-worker image run as N replicas)."
    ),
    WORK_POOLS["docker"]: "tenantflow flow runs as containers of the tenantflow-worker image.",
    WORK_POOLS["kubernetes"]: (
        "tenantflow flow runs as Kubernetes Jobs of the tenantflow-worker image."
    ),
    MIGRATE_POOL: (
        "tenantflow's migrate runs only, as subprocesses of the one process worker that "
        "holds the schema owner's login (MIGRATION_DATABASE_URL); no tenant flow runs here."
    ),
}


class BootstrapError(TenantflowError, RuntimeError):
    """The Prefect installation could not be brought to the wanted state."""


# --------------------------------------------------------------------------- pull step


def set_project_directory(directory: str | None = None) -> dict[str, str]:
    """Pull step: change into the folder holding `flows/` before the flow is loaded.

    Args:
        directory: the folder; by default `$TENANTFLOW_PROJECT_DIR` of the flow run's
            process, read now (at run time), not when the deployment was created.

    Returns:
        `{"directory": <absolute folder>}`, like Prefect's `set_working_directory`.

    Raises:
        RuntimeError: neither `directory` nor `TENANTFLOW_PROJECT_DIR` is set.
        FileNotFoundError: the folder has no `flows/`.
    """
    folder = directory or os.environ.get(PROJECT_DIR_ENV)
    if not folder:
        raise RuntimeError(
            f"{PROJECT_DIR_ENV} is not set in this worker's environment: set it to the folder "
            "that holds flows/ (the tenantflow-worker image sets /app)"
        )
    path = Path(folder).resolve()
    if not (path / "flows").is_dir():
        raise FileNotFoundError(f"{PROJECT_DIR_ENV}={path} has no flows/ folder")
    os.chdir(path)
    return {"directory": str(path)}


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """What `bootstrap()` found and did, per object."""

    work_pools: dict[str, Outcome] = field(default_factory=dict)
    concurrency_limits: dict[str, Outcome] = field(default_factory=dict)
    automations: dict[str, Outcome] = field(default_factory=dict)
    #: False when ALERT_WEBHOOK_URL is not set: no alert automations.
    alerts: bool = False

    def summary(self) -> str:
        parts = [f"work pool {name}: {done}" for name, done in self.work_pools.items()]
        parts += [
            f"concurrency limit {name}: {done}" for name, done in self.concurrency_limits.items()
        ]
        parts += [f"automation {name}: {done}" for name, done in self.automations.items()]
        if not self.alerts:
            parts.append("alerts: off (ALERT_WEBHOOK_URL is not set)")
        return "; ".join(parts)


def base_job_template(
    pool_type: PoolType, project_dir: Path, *, image: str | None = None
) -> dict[str, Any]:
    """The base job template a `pool_type` pool is created with.

    `process`: the tenantflow worker's (`tenantflow.worker.base_job_template`: Prefect's
    own without `command`, `env` and `working_dir`). `docker` and `kubernetes`:
    `deployments/<type>-base-job-template.json` of the project, with `image` baked into
    the job configuration: a flow run cannot choose its image. The tenantflow docker and
    kubernetes workers render every run from this template, their own copy, never the
    pool's as the API stores it (`tenantflow.container_jobs`); the pool gets it too, so the
    Prefect server refuses (422) job variables it lacks.

    Raises:
        BootstrapError: the file is missing or malformed, a job variable could change what
            runs, or `image` is given for a process pool.
    """
    if pool_type == "process":
        if image:
            raise BootstrapError("a process pool runs flow runs in place: it takes no image")
        from tenantflow.worker import base_job_template as process_template

        return process_template()
    path = project_dir / "deployments" / f"{pool_type}-base-job-template.json"
    try:
        template: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BootstrapError(
            f"cannot read the {pool_type} base job template {path}: {error}"
        ) from None
    if set(template) != {"job_configuration", "variables"}:
        raise BootstrapError(f"{path}: a base job template has job_configuration and variables")
    variables = template["variables"]
    overridable = set(variables.get("properties", {})) & _LOCKED_JOB_VARIABLES
    if overridable or variables.get("additionalProperties") is not False:
        raise BootstrapError(
            f"{path}: job variables must not override {sorted(_LOCKED_JOB_VARIABLES)} and the "
            "variables schema needs additionalProperties: false"
        )
    if image:
        configuration = template["job_configuration"]
        if pool_type == "docker":
            configuration["image"] = image
        else:
            for container in configuration["job_manifest"]["spec"]["template"]["spec"][
                "containers"
            ]:
                container["image"] = image
    return template


#: What a docker or kubernetes flow run may never choose for itself (fixed in the
#: templates' job configuration or by the tenantflow container workers): prefect-docker's
#: and prefect-kubernetes' own fields among them.
_LOCKED_JOB_VARIABLES = frozenset(
    {
        "command",
        "env",
        "image",
        "image_pull_policy",
        "volumes",
        "networks",
        "network_mode",
        "extra_hosts",
        "privileged",
        "user",
        "container_create_kwargs",
        "registry_credentials",
        "namespace",
        "service_account_name",
        "secret_name",
        "job_manifest",
        "cluster_config",
    }
)


@asynccontextmanager
async def _client(api_url: str | None, auth_string: str | None = None) -> AsyncIterator[Any]:
    """A Prefect client for `api_url` (default: PREFECT_API_URL), never an ephemeral server.

    `auth_string` (default: PREFECT_API_AUTH_STRING) is the API's basic auth.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    url = api_url or PREFECT_API_URL.value()
    if not url:
        # NOTE: without it Prefect would start a temporary server of its own and
        # bootstrap that one, silently.
        raise BootstrapError("PREFECT_API_URL is not set: which Prefect server to bootstrap?")
    updates: dict[Any, Any] = {PREFECT_API_URL: url}
    if auth_string:
        updates[PREFECT_API_AUTH_STRING] = auth_string
    with temporary_settings(updates=updates):
        async with get_client() as client:
            try:
                await client.hello()
            except httpx.HTTPStatusError as error:
                raise BootstrapError(
                    f"the Prefect API at {url} answered {error.response.status_code}"
                    + (
                        " (set PREFECT_API_AUTH_STRING)"
                        if error.response.status_code == 401
                        else ""
                    )
                ) from None
            except httpx.HTTPError as error:
                raise BootstrapError(
                    f"the Prefect API at {url} does not answer ({type(error).__name__})"
                ) from None
            yield client


async def _ensure_work_pool(
    client: Any, name: str, pool_type: PoolType, template: dict[str, Any]
) -> Outcome:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    description = _POOL_DESCRIPTIONS[name]
    try:
        existing = await client.read_work_pool(name)
    except ObjectNotFound:
        try:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name, type=pool_type, description=description, base_job_template=template
                )
            )
            return "created"
        except ObjectAlreadyExists:
            # NOTE: another bootstrap won the race; carry on as an update.
            existing = await client.read_work_pool(name)
    if existing.type != pool_type:
        raise BootstrapError(
            f"work pool {name} exists with type {existing.type!r}, not {pool_type!r}: delete it "
            f"(prefect work-pool delete {name}) and bootstrap again"
        )
    if existing.is_paused:
        log.warning("work pool %s is paused: its workers take no runs until it is resumed", name)
    if existing.base_job_template == template and existing.description == description:
        return "unchanged"
    await client.update_work_pool(
        name, WorkPoolUpdate(base_job_template=template, description=description)
    )
    return "updated"


async def _ensure_concurrency_limit(client: Any, name: str, limit: int) -> Outcome:
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        existing = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True)
            )
            return "created"
        except ObjectAlreadyExists:
            existing = await client.read_global_concurrency_limit_by_name(name)
    # NOTE: a slot decay would turn the cap into a rate limit; the budget is a cap.
    if existing.limit == limit and existing.active and not existing.slot_decay_per_second:
        return "unchanged"
    await client.update_global_concurrency_limit(
        name,
        GlobalConcurrencyLimitUpdate(limit=limit, active=True, slot_decay_per_second=0.0),
    )
    return "updated"


async def abootstrap(
    *,
    concurrency_limit: str,
    concurrency_slots: int,
    flow_slots: int,
    project_dir: Path,
    pool_types: Sequence[PoolType] = ("process",),
    api_url: str | None = None,
    image: str | None = None,
    auth_string: str | None = None,
    alerts: Alerts | None = None,
) -> BootstrapResult:
    """Create or update the work pools, the database concurrency limit and the automations.

    The work pools: one per `pool_types` (the tenant deployments'), and `tenantflow-migrate`
    (a process pool for `migrate` alone), all with templates that lock what runs.

    Safe to run any number of times, also concurrently: an object that already matches is
    left alone (`unchanged`), one that differs is updated in place (its id, runs and held
    slots survive), a work pool of another type is an error rather than replaced.

    Args:
        concurrency_limit: name of the global concurrency limit (`DB_CONCURRENCY_LIMIT`).
        concurrency_slots: its size (`DB_CONCURRENCY_SLOTS`).
        flow_slots: slots one flow run takes (`DB_FLOW_SLOTS`); must fit in the limit.
        project_dir: the project folder (for `deployments/*-base-job-template.json`).
        pool_types: which work pools to create or update.
        api_url: the Prefect API; default PREFECT_API_URL.
        image: the flow runs' image of docker and kubernetes pools (baked into their
            templates; default the templates' `tenantflow-worker:latest`).
        auth_string: the API's basic auth; default PREFECT_API_AUTH_STRING.
        alerts: the zombie window and the alerts' destination and window (default:
            `Alerts()`, a 90 s zombie window and no alerts).
    """
    if flow_slots > concurrency_slots:
        raise BootstrapError(
            f"DB_FLOW_SLOTS={flow_slots} exceeds DB_CONCURRENCY_SLOTS={concurrency_slots}: "
            "no flow run could ever take its slots"
        )
    pools: dict[str, tuple[PoolType, dict[str, Any]]] = {
        WORK_POOLS[kind]: (
            kind,
            base_job_template(kind, project_dir, image=None if kind == "process" else image),
        )
        for kind in pool_types
    }
    # NOTE: `migrate` always stays on its own process pool, whatever the tenant pools are.
    pools[MIGRATE_POOL] = ("process", base_job_template("process", project_dir))
    result = BootstrapResult()
    async with _client(api_url, auth_string) as client:
        for name, (kind, template) in pools.items():
            result.work_pools[name] = await _ensure_work_pool(client, name, kind, template)
        result.concurrency_limits[concurrency_limit] = await _ensure_concurrency_limit(
            client, concurrency_limit, concurrency_slots
        )
        result.automations.update(await ensure_automations(client, alerts or Alerts()))
    return dataclasses.replace(result, alerts=bool((alerts or Alerts()).webhook_url))


def bootstrap(
    *,
    concurrency_limit: str,
    concurrency_slots: int,
    flow_slots: int,
    project_dir: Path,
    pool_types: Sequence[PoolType] = ("process",),
    api_url: str | None = None,
    image: str | None = None,
    auth_string: str | None = None,
    alerts: Alerts | None = None,
) -> BootstrapResult:
    """Synchronous `abootstrap()`, for the CLI and the local stack."""
    return asyncio.run(
        abootstrap(
            concurrency_limit=concurrency_limit,
            concurrency_slots=concurrency_slots,
            flow_slots=flow_slots,
            project_dir=project_dir,
            pool_types=pool_types,
            api_url=api_url,
            image=image,
            auth_string=auth_string,
            alerts=alerts,
        )
    )


# --------------------------------------------------------------------------- deploy


def _declared_pool(name: str, project_dir: Path) -> str | None:
    declared = declared_deployment(name, project_dir)
    return declared.work_pool if declared else None


@dataclass(frozen=True)
class DeployResult:
    deployments: list[str]
    work_pool: str
    seconds: float


def deploy(
    *,
    project_dir: Path,
    env: Mapping[str, str] | None = None,
    pool: str | None = None,
    job_variables: Mapping[str, str] | None = None,
    timeout: float = 900,
) -> DeployResult:
    """`prefect --no-prompt deploy` of every deployment in `prefect.yaml`.

    Without `pool`, one `deploy --all`: every deployment onto the pool `prefect.yaml` names
    (`tenantflow-process`; `migrate` onto `tenantflow-migrate`). With `pool` (scale-out
    onto a docker or kubernetes pool), one `deploy --name N --pool P` per tenant deployment,
    because Prefect ignores `--pool` and `--job-variable` when it deploys several
    deployments in one call; a deployment declared for `tenantflow-migrate` stays there
    (`deploy --name migrate`), so the owner's login never reaches the tenant pool.

    Args:
        project_dir: the folder with `prefect.yaml` and `flows/` (the command's cwd).
        env: environment for the command on top of this process's (PREFECT_API_URL...).
        pool: deploy onto this work pool instead.
        job_variables: `--job-variable k=v` for each deployment (with `pool` only).
        timeout: seconds for each `prefect deploy` call.
    """
    names = deployment_names(project_dir)
    if job_variables and not pool:
        raise DeployError("job variables are only passed with a work pool (--pool)")
    base = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    if pool is None:
        calls = [[*base, "--all"]]
    else:
        extra = [f"--job-variable={key}={value}" for key, value in (job_variables or {}).items()]
        calls = [
            [*base, "--name", name]
            if _declared_pool(name, project_dir) == MIGRATE_POOL
            else [*base, "--name", name, "--pool", pool, *extra]
            for name in names
        ]
    child_env = {**os.environ, **(env or {})}
    if not child_env.get("PREFECT_API_URL"):
        raise DeployError("PREFECT_API_URL is not set: which Prefect server to deploy to?")
    started = time.monotonic()
    for argv in calls:
        try:
            done = subprocess.run(  # noqa: S603
                argv,
                cwd=project_dir,
                env=child_env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DeployError(f"`{' '.join(argv[2:])}` took longer than {timeout:.0f}s") from None
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()[-3000:]
            raise DeployError(f"`{' '.join(argv[2:])}` failed (exit {done.returncode}):\n{output}")
    return DeployResult(
        deployments=names,
        work_pool=pool or WORK_POOLS["process"],
        seconds=time.monotonic() - started,
    )
