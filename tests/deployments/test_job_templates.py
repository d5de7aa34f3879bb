"""Job variables cannot change what a flow run runs: the pools' templates and our worker.

Without Docker or Kubernetes: the docker and kubernetes templates are rendered as their
workers render them (Prefect's `BaseJobConfiguration.from_template_and_values`) with
hostile job variables, and the hostile values are looked for in the result. The variables
schemas are checked as the Prefect server checks a run's job variables.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prefect.client.schemas.objects import FlowRun, WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect.utilities.schema_tools import ValidationError, validate
from prefect.workers.base import BaseJobConfiguration
from pydantic import ConfigDict

from tenantflow.deployments import MIGRATE_POOL, PoolType, base_job_template
from tenantflow.settings import Settings
from tenantflow.worker import (
    BASIC_ENVIRONMENT,
    LOCKED_VARIABLES,
    TenantflowJobConfiguration,
    TenantflowProcessWorker,
    engine_command,
)

PROJECT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example/tenantflow-worker:1.4.0"
MARKER = f"tenantflow-hostile-{uuid.uuid4().hex[:8]}"

#: Job variables an attacker with API access would send; each value carries MARKER.
HOSTILE: dict[str, Any] = {
    "command": f"touch /tmp/{MARKER}",
    "env": {"SUPABASE_JWT_SECRET": MARKER, "PREFECT_API_URL": f"http://{MARKER}"},
    "env.DATABASE_URL": f"postgresql://{MARKER}",
    "working_dir": f"/srv/{MARKER}",
    "image": f"{MARKER}/image:latest",
    "image_pull_policy": "Always",
    "volumes": [f"/:/{MARKER}"],
    "network_mode": "host",
    "privileged": True,
    "namespace": f"{MARKER}-kube-system",
    "service_account_name": f"{MARKER}-cluster-admin",
    "secret_name": f"{MARKER}-other-secret",
    "job_manifest": {"spec": {"template": {"spec": {"hostPID": True, "x": MARKER}}}},
}
#: Variables a run may set, per pool type (harmless: names, labels, sizes, output).
ALLOWED: dict[PoolType, dict[str, Any]] = {
    "process": {"stream_output": False, "name": "n", "labels": {"team": "a"}},
    "docker": {"mem_limit": "2g", "stream_output": False, "name": "n"},
    "kubernetes": {"cpu_request": "500m", "memory_limit": "2Gi", "finished_job_ttl": 60},
}
KINDS: tuple[PoolType, ...] = ("process", "docker", "kubernetes")


class Rendered(BaseJobConfiguration):
    """What a worker renders, every key kept (the docker and kubernetes workers' classes
    are not installed here; they take the same rendered values)."""

    model_config: ClassVar[ConfigDict] = ConfigDict(extra="allow")


def _template(kind: PoolType) -> dict[str, Any]:
    return base_job_template(kind, PROJECT, image=None if kind == "process" else IMAGE)


def _flow_run() -> FlowRun:
    return FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="calm-otter")


@pytest.mark.parametrize("kind", KINDS)
async def test_hostile_job_variables_do_not_reach_the_rendered_job(kind: PoolType) -> None:
    template = _template(kind)
    rendered: Rendered = await Rendered.from_template_and_values(template, HOSTILE)
    text = json.dumps(rendered.model_dump(mode="json"))
    assert MARKER not in text
    assert "hostPID" not in text
    assert rendered.command != HOSTILE["command"]
    assert rendered.env == {}
    dumped = rendered.model_dump(mode="json")
    assert "working_dir" not in dumped and "network_mode" not in dumped
    if kind == "docker":
        assert dumped["image"] == IMAGE
        # NOTE: the command and the settings file's mount are the tenantflow docker
        # worker's, per run (tests/image/test_docker_pool.py); the template has neither.
        assert "volumes" not in dumped and "networks" not in dumped
        assert dumped["privileged"] is False
        assert dumped["command"] is None
    if kind == "kubernetes":
        assert dumped["namespace"] == "tenantflow"
        manifest = dumped["job_manifest"]
        assert manifest["metadata"]["namespace"] == "tenantflow"
        pod = manifest["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "default"
        (container,) = pod["containers"]
        assert container["image"] == IMAGE
        assert "args" not in container  # the worker's, per run (test_kubernetes_manifest)
        assert container["envFrom"] == [{"secretRef": {"name": "tenantflow-worker"}}]
        assert "env" not in container


@pytest.mark.parametrize("kind", KINDS)
def test_the_variables_schema_refuses_hostile_job_variables(kind: PoolType) -> None:
    """As the server validates a run's job variables (422 on failure)."""
    schema = _template(kind)["variables"]
    assert schema["additionalProperties"] is False
    assert not set(schema["properties"]) & set(HOSTILE)
    for key, value in HOSTILE.items():
        with pytest.raises(ValidationError):
            validate(
                {key: value},
                schema,
                raise_on_error=True,
                preprocess=True,
                ignore_required=True,
                allow_none_with_default=True,
            )
    validate(
        ALLOWED[kind],
        schema,
        raise_on_error=True,
        preprocess=True,
        ignore_required=True,
        allow_none_with_default=True,
    )


def _widened(template: dict[str, Any]) -> dict[str, Any]:
    """The process template with command, env and working_dir put back (as Prefect's)."""
    widened = copy.deepcopy(template)
    for key in LOCKED_VARIABLES:
        widened["job_configuration"][key] = "{{ " + key + " }}"
        widened["variables"]["properties"][key] = {}
    widened["variables"].pop("additionalProperties")
    return widened


def _prepared(
    configuration: TenantflowJobConfiguration, deployment: str, pool: str
) -> TenantflowJobConfiguration:
    flow_run = _flow_run()
    configuration.prepare_for_flow_run(
        flow_run,
        deployment=DeploymentResponse.model_validate(
            {"name": deployment, "flow_id": flow_run.flow_id}
        ),
        work_pool=WorkPool.model_validate({"name": pool, "type": "process"}),
        worker_name="w",
    )
    return configuration


#: What the worker's environment may hold that no flow run gets.
WORKER_ONLY = {
    "MIGRATION_DATABASE_URL": f"postgresql://postgres:{MARKER}@127.0.0.1:5432/postgres",
    "AWS_SECRET_ACCESS_KEY": MARKER,
    "PYTHONPATH": f"/srv/{MARKER}",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql://prefect:{MARKER}@db/prefect",
    "PREFECT__FLOW_RUN_ID": str(uuid.uuid4()),
}


@pytest.mark.parametrize("widen", [False, True], ids=["pool-template", "widened-template"])
async def test_the_worker_runs_the_declared_flow_with_an_allow_listed_environment(
    widen: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when the pool's template was widened through the API, the worker holds."""
    monkeypatch.setenv("TENANTFLOW_PROJECT_DIR", str(PROJECT))
    monkeypatch.setenv("DATABASE_URL", "postgresql://tenantflow_worker:pw@127.0.0.1:6543/postgres")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    for key, value in WORKER_ONLY.items():
        monkeypatch.setenv(key, value)
    template = TenantflowProcessWorker.get_default_base_job_template()
    assert template == _template("process")
    if widen:
        template = _widened(template)
    configuration: TenantflowJobConfiguration = (
        await TenantflowJobConfiguration.from_template_and_values(template, HOSTILE)
    )
    assert configuration.command is None and configuration.env == {}
    _prepared(configuration, "noop", "tenantflow-process")
    entrypoint = f"{PROJECT / 'flows' / 'noop.py'}:noop"
    assert configuration.command == engine_command(entrypoint)
    assert configuration.command is not None
    assert configuration.command.split() == [
        sys.executable,
        "-m",
        "tenantflow.flow_run",
        entrypoint,
    ]
    # The run's own temporary folder, not one a job variable names.
    assert configuration.working_dir is None
    env = configuration.env
    assert MARKER not in json.dumps(env)
    assert env["PREFECT__FLOW_ENTRYPOINT"] == entrypoint
    assert env["PREFECT__FLOW_RUN_ID"] != WORKER_ONLY["PREFECT__FLOW_RUN_ID"]
    assert env["PREFECT__DEPLOYMENT_NAME"] == "noop"
    # What the run needs of the worker's environment, and nothing it does not.
    for key in ("PATH", "DATABASE_URL", "TENANTFLOW_PROJECT_DIR", "LC_ALL"):
        assert env[key] == os.environ[key], key
    assert not set(WORKER_ONLY) - {"PREFECT__FLOW_RUN_ID"} & set(env)
    settings = {name.upper() for name in Settings.model_fields}
    strays = {
        key
        for key in env
        if key not in settings | BASIC_ENVIRONMENT and not key.startswith(("PREFECT_", "LC_"))
    }
    assert strays == set()


def test_only_runs_declared_for_the_migrate_pool_get_the_migration_login(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENANTFLOW_PROJECT_DIR", str(PROJECT))
    monkeypatch.setenv("MIGRATION_DATABASE_URL", WORKER_ONLY["MIGRATION_DATABASE_URL"])
    migrate = _prepared(TenantflowJobConfiguration(), "migrate", MIGRATE_POOL)
    assert migrate._refusal is None
    assert migrate.env["MIGRATION_DATABASE_URL"] == WORKER_ONLY["MIGRATION_DATABASE_URL"]
    report = _prepared(TenantflowJobConfiguration(), "client-report", "tenantflow-process")
    assert report._refusal is None
    assert "MIGRATION_DATABASE_URL" not in report.env


@pytest.mark.parametrize(
    ("deployment", "pool"),
    [("migrate", "tenantflow-process"), ("client-report", MIGRATE_POOL), ("noop", "other")],
)
def test_a_deployment_declared_for_another_pool_is_refused(
    deployment: str, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment re-pointed at another pool through the API never runs there."""
    monkeypatch.setenv("TENANTFLOW_PROJECT_DIR", str(PROJECT))
    configuration = _prepared(TenantflowJobConfiguration(), deployment, pool)
    assert configuration._refusal is not None
    assert f"deployment {deployment!r} is declared for work pool" in configuration._refusal
    assert f"not for this worker's pool {pool!r}" in configuration._refusal
    assert configuration.command is None and configuration.env == {}


def test_the_worker_keeps_prefects_own_process_worker_registered() -> None:
    from prefect.workers.base import BaseWorker
    from prefect.workers.process import ProcessWorker

    assert TenantflowProcessWorker.type == "process"
    assert BaseWorker.get_worker_class_from_type("process") is ProcessWorker
