"""The Job the tenantflow kubernetes worker would submit, rendered by prefect-kubernetes' code.

No cluster runs here. The manifest is built as the worker builds it for a flow run
(`TenantflowKubernetesJobConfiguration.render`: the worker's own template, the run's job
variables checked, then prefect-kubernetes' `prepare_for_flow_run`), from Prefect's own
flow-run, deployment and work-pool objects, and checked for what a cluster would be asked
to run: the image, the command, a non-root user without privileges, secrets only as
references, requests and limits. What this cannot prove (that a cluster admits and runs
the Job): docs/operations.md.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect_kubernetes.worker import KubernetesWorker  # type: ignore[import-untyped]

from tenantflow.container_jobs import IMAGE_ENV, JobVariablesRefused, container_settings
from tenantflow.deployments import WORK_POOLS
from tenantflow.kubernetes_worker import (
    TenantflowKubernetesJobConfiguration,
    TenantflowKubernetesWorker,
)
from tenantflow.project import PROJECT_DIR_ENV

PROJECT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example/tenantflow-worker:1.4.0"
MARKER = f"tenantflow-secret-{uuid.uuid4().hex[:8]}"
#: The worker's settings, every one of them a secret but the API's URL.
WORKER_SETTINGS = {
    "PREFECT_API_URL": "http://prefect.tenantflow.svc:4200/api",
    "PREFECT_API_AUTH_STRING": f"admin:{MARKER}-auth",
    "DATABASE_URL": f"postgresql://tenant:{MARKER}-db@pooler:6543/postgres",
    "MIGRATION_DATABASE_URL": f"postgresql://owner:{MARKER}-owner@pooler:5432/postgres",
    "SUPABASE_URL": "https://auth.example",
    "SUPABASE_ANON_KEY": f"{MARKER}-anon",
    "SEAL_PRIVATE_KEYS": f'{{"kty":"OKP","d":"{MARKER}-seal"}}',
}


@pytest.fixture(autouse=True)
def worker_settings(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The kubernetes worker's environment: its settings, its project, its image."""
    for key, value in WORKER_SETTINGS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(PROJECT_DIR_ENV, str(PROJECT))
    monkeypatch.setenv(IMAGE_ENV, IMAGE)
    return WORKER_SETTINGS


def _objects(
    deployment: str = "client-report", **job_variables: Any
) -> tuple[FlowRun, DeploymentResponse, Flow]:
    flow = Flow(id=uuid.uuid4(), name=deployment, labels={})
    declared = DeploymentResponse(id=uuid.uuid4(), name=deployment, flow_id=flow.id, labels={})
    run = FlowRun(
        id=uuid.uuid4(),
        flow_id=flow.id,
        name="calm-otter",
        deployment_id=declared.id,
        job_variables=job_variables,
    )
    return run, declared, flow


def _manifest(**job_variables: Any) -> dict[str, Any]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run, deployment, flow = _objects(**job_variables)
    # NOTE: Prefect read its settings when it was imported; the worker's are these.
    with temporary_settings(updates={PREFECT_API_URL: WORKER_SETTINGS["PREFECT_API_URL"]}):
        configuration = TenantflowKubernetesJobConfiguration.render(
            run, deployment, flow, worker_name="tenantflow-kubernetes-0"
        )
    manifest: dict[str, Any] = configuration.job_manifest
    return manifest


def test_the_job_runs_the_declared_deployment_in_the_workers_image() -> None:
    manifest = _manifest()
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert manifest["metadata"]["namespace"] == "tenantflow"
    assert manifest["spec"]["backoffLimit"] == 0
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == ["python", "-m", "tenantflow.container_run", "client-report"]
    assert "command" not in container  # the image's entrypoint: none, so `args` is the command
    assert pod["restartPolicy"] == "Never"


def test_the_job_runs_as_a_non_root_user_without_privileges() -> None:
    pod = _manifest()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsGroup"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not {"hostNetwork", "hostPID", "hostIPC", "nodeName"} & set(pod)
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in security
    # Only scratch space: no host path, no other Secret mounted as files.
    assert all(set(volume) == {"name", "emptyDir"} for volume in pod["volumes"])
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounted == {"/home/tenantflow", "/tmp"}  # noqa: S108 (the pod's own emptyDir)


def test_secrets_reach_the_job_by_reference_only() -> None:
    manifest = _manifest()
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "tenantflow-worker"}}]
    env = {entry["name"]: entry["value"] for entry in container["env"]}
    assert env["PREFECT_API_URL"] == WORKER_SETTINGS["PREFECT_API_URL"]
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"].isdigit()
    assert all(
        name.startswith("PREFECT__")
        or name
        in {
            "PREFECT_API_URL",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
            "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR",
        }
        for name in env
    ), sorted(env)
    assert MARKER not in json.dumps(manifest)
    # What the Secret must hold, the worker's settings file's own list: never the owner's.
    secret = container_settings()
    assert "MIGRATION_DATABASE_URL" not in secret
    assert {"DATABASE_URL", "SEAL_PRIVATE_KEYS", "PREFECT_API_AUTH_STRING"} <= set(secret)


def test_requests_and_limits_come_from_the_templates_variables() -> None:
    (container,) = _manifest()["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"memory": "1Gi"},
    }
    (sized,) = _manifest(cpu_request="1", memory_limit="2Gi")["spec"]["template"]["spec"][
        "containers"
    ]
    assert sized["resources"]["requests"]["cpu"] == "1"
    assert sized["resources"]["limits"]["memory"] == "2Gi"


@pytest.mark.parametrize(
    "job_variables",
    [
        {"image": "docker.io/library/alpine:3.20"},
        {"command": "sh -c 'echo pwned'"},
        {"env": {"PREFECT_API_AUTH_STRING": "mine"}},
        {"namespace": "kube-system"},
        {"service_account_name": "cluster-admin"},
        {"job_manifest": {"spec": {"template": {"spec": {"hostPID": True}}}}},
        {"cluster_config": {"config": {}, "context_name": "other"}},
        {"cpu_request": 4},
    ],
    ids=lambda variables: next(iter(variables)),
)
def test_job_variables_the_template_lacks_or_refuses_fail_before_any_job(
    job_variables: dict[str, Any],
) -> None:
    with pytest.raises(JobVariablesRefused, match="refused"):
        _manifest(**job_variables)


def test_the_pools_template_as_the_api_stores_it_is_not_read() -> None:
    """A pool whose template the API changed to Prefect's own, privileged and hostile."""
    hostile = KubernetesWorker.get_default_base_job_template()
    container = hostile["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    container.update({"image": "evil/image", "securityContext": {"privileged": True}})
    pool = WorkPool(
        name=WORK_POOLS["kubernetes"],
        type="kubernetes",
        base_job_template=hostile,
        default_queue_id=uuid.uuid4(),
    )
    run, deployment, flow = _objects()
    configuration = TenantflowKubernetesJobConfiguration.render(
        run, deployment, flow, work_pool=pool, worker_name="w"
    )
    text = json.dumps(configuration.job_manifest)
    assert "evil/image" not in text and '"privileged": true' not in text
    assert (
        TenantflowKubernetesWorker.get_default_base_job_template()["job_configuration"][
            "job_manifest"
        ]["spec"]["template"]["spec"]["containers"][0]["image"]
        == IMAGE
    )


@pytest.mark.parametrize(
    ("deployment", "reason"), [("migrate", "tenantflow-migrate"), ("rogue", "is not declared")]
)
def test_migrate_and_undeclared_deployments_get_no_job(deployment: str, reason: str) -> None:
    run, declared, flow = _objects(deployment)
    with pytest.raises(RuntimeError, match=reason):
        TenantflowKubernetesJobConfiguration.render(run, declared, flow)
