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
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.schema_tools import ValidationError, validate
from prefect.workers.base import BaseJobConfiguration
from pydantic import ConfigDict

from tenantflow.deployments import PoolType, base_job_template
from tenantflow.worker import (
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
        assert dumped["volumes"] == ["/etc/tenantflow/worker.env:/app/.env:ro"]
        assert dumped["privileged"] is False
        assert dumped["command"] == "prefect flow-run execute"
    if kind == "kubernetes":
        assert dumped["namespace"] == "tenantflow"
        manifest = dumped["job_manifest"]
        assert manifest["metadata"]["namespace"] == "tenantflow"
        pod = manifest["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "default"
        (container,) = pod["containers"]
        assert container["image"] == IMAGE
        assert container["args"] == ["prefect", "flow-run", "execute"]
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


@pytest.mark.parametrize("widen", [False, True], ids=["pool-template", "widened-template"])
async def test_the_worker_runs_the_engine_with_its_own_environment(widen: bool) -> None:
    """Even when the pool's template was widened through the API, the worker holds."""
    template = TenantflowProcessWorker.get_default_base_job_template()
    assert template == _template("process")
    if widen:
        template = _widened(template)
    configuration: TenantflowJobConfiguration = (
        await TenantflowJobConfiguration.from_template_and_values(template, HOSTILE)
    )
    assert configuration.command is None and configuration.env == {}
    flow_run = _flow_run()
    configuration.prepare_for_flow_run(flow_run, worker_name="w")
    command = configuration.command
    assert command is not None
    assert command == engine_command()
    assert command.split() == [sys.executable, "-m", "prefect.engine"]
    assert configuration.working_dir is None
    assert MARKER not in json.dumps(configuration.env)
    assert configuration.env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    # The worker's own environment, plus Prefect's own per-run variables and settings.
    for key, value in os.environ.items():
        if not key.startswith("PREFECT"):
            assert configuration.env[key] == value, key
    added = set(configuration.env) - set(os.environ)
    assert all(key.startswith("PREFECT") for key in added), added


def test_the_worker_keeps_prefects_own_process_worker_registered() -> None:
    from prefect.workers.base import BaseWorker
    from prefect.workers.process import ProcessWorker

    assert TenantflowProcessWorker.type == "process"
    assert BaseWorker.get_worker_class_from_type("process") is ProcessWorker
