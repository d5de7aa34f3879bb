"""The tenantflow kubernetes worker: prefect-kubernetes' worker, with what runs locked.

Each flow run of `tenantflow-kubernetes` is a Job rendered from the worker's own template
(`deployments/kubernetes-base-job-template.json`, `tenantflow.container_jobs`), never the
pool's as the API stores it, job variables checked against its own schema; prefect-kubernetes'
own code then builds the manifest (`KubernetesWorkerJobConfiguration.prepare_for_flow_run`)
and this worker fixes, in its one container:

* `image`: the worker's `TENANTFLOW_FLOW_RUN_IMAGE`; `args`: `python -m
  tenantflow.container_run NAME` for a deployment its `prefect.yaml` declares (never
  `migrate`);
* `env`: the run's ids, Prefect's API URL, the heartbeat and the SIGTERM behaviour only;
  the secrets come by reference, `envFrom` the Secret `tenantflow-worker` (what
  `tenantflow.container_jobs.container_settings` lists, never MIGRATION_DATABASE_URL);
* the rest is the template's: namespace `tenantflow`, non-root uid 10001, no privilege
  escalation, every capability dropped, read-only root file system, no service-account
  token, requests and a memory limit.

No cluster runs here: tests/deployments/test_kubernetes_manifest.py renders the manifest
through this code and checks it; docs/operations.md says what that does and does not prove.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self
from uuid import UUID

import anyio.abc
from prefect_kubernetes.worker import (  # type: ignore[import-untyped]
    KubernetesWorker,
    KubernetesWorkerJobConfiguration,
    KubernetesWorkerResult,
)
from pydantic import model_validator

from tenantflow.container_jobs import (
    ContainerWorker,
    LockedJobConfiguration,
    container_command,
    container_environment,
    declared_container_deployment,
    flow_run_image,
)
from tenantflow.deployments import PoolType
from tenantflow.worker import flow_heartbeat_seconds

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

__all__ = ["TenantflowKubernetesJobConfiguration", "TenantflowKubernetesWorker"]


class TenantflowKubernetesJobConfiguration(
    LockedJobConfiguration,
    KubernetesWorkerJobConfiguration,  # type: ignore[misc]
):
    """A kubernetes job configuration whose image, command and environment are the
    worker's and whose manifest is the worker's own template's."""

    pool_type: ClassVar[PoolType] = "kubernetes"

    @model_validator(mode="after")
    def _locked(self) -> Self:
        self._lock()
        return self

    def _lock(self) -> None:
        self.command: str | None = None
        self.env: dict[str, str | None] = {}
        self.cluster_config = None

    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        # NOTE: instead of every Prefect setting of the worker (PREFECT_API_AUTH_STRING
        # among them, which prefect-kubernetes would write into the manifest).
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        return {"PREFECT_API_URL": url} if url else {}

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        name = declared_container_deployment(deployment)
        self._lock()
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        prepared = self.env if isinstance(self.env, dict) else {}
        env = container_environment(prepared, flow_heartbeat_seconds())
        self.env = dict(env)
        self.command = None
        (container, *others) = self.job_manifest["spec"]["template"]["spec"]["containers"]
        if others:
            raise RuntimeError("the tenantflow kubernetes template has one container per Job")
        container["image"] = flow_run_image()
        container["args"] = container_command(name)
        container.pop("command", None)
        container["env"] = [{"name": key, "value": value} for key, value in env.items()]


class TenantflowKubernetesWorker(ContainerWorker, KubernetesWorker):  # type: ignore[misc]
    """prefect-kubernetes' worker (type `kubernetes`) that runs only declared code, its way."""

    pool_type: ClassVar[PoolType] = "kubernetes"
    job_configuration = TenantflowKubernetesJobConfiguration
    _description = (
        "tenantflow's kubernetes worker: each flow run is a Job of the worker's image on the "
        "entrypoint the image's prefect.yaml declares; job variables, templates and "
        "deployments changed through the API cannot change its image, command, environment "
        "or manifest."
    )
    _display_name = "tenantflow kubernetes"

    async def run(
        self,
        flow_run: FlowRun,
        configuration: KubernetesWorkerJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> KubernetesWorkerResult:
        if not isinstance(configuration, TenantflowKubernetesJobConfiguration):
            raise RuntimeError(
                "refusing to start a flow run whose job configuration was not prepared by "
                "the tenantflow kubernetes worker"
            )
        with self.running(flow_run.id):
            result: KubernetesWorkerResult = await super().run(flow_run, configuration, task_status)
            return result
