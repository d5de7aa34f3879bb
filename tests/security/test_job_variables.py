"""Job variables cannot change what a flow run runs, through the real server and worker.

The server refuses a deployment run asking for `command` or `env` (the pool's template
names no such variable and refuses unknown ones). Two ways still store such job
variables: `POST /flow_runs/` with a work pool (the server does not validate job
variables there) and a pool template widened through the API. Runs made both ways go
through the stack's worker, and a probe flow reports what its process saw: Prefect's
engine command, none of the injected environment, the worker's OS user.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterId,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import PrefectHTTPStatusError

from tenantflow.deployments import WORK_POOLS
from tenantflow.localstack import Stack
from tenantflow.localstack.services import grant_traversal
from tenantflow.worker import LOCKED_VARIABLES

pytestmark = [pytest.mark.stack, pytest.mark.slow]

POOL = WORK_POOLS["process"]
FLOW = '''"""Reports what the flow-run process sees, for the job-variable tests."""
import json
import os
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact


@flow(name="tenantflow-lock-probe", persist_result=False)
def probe(marker: str) -> None:
    argv = [p.decode() for p in Path("/proc/self/cmdline").read_bytes().split(b"\\0") if p]
    seen = {
        "argv": argv,
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "marker_in_env": any(marker in f"{k}={v}" for k, v in os.environ.items()),
        "jwt_secret_set": "SUPABASE_JWT_SECRET" in os.environ,
    }
    create_markdown_artifact(markdown=json.dumps(seen), key="lock-probe")
'''
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


@dataclass
class Probe:
    deployment_id: UUID
    flow_id: UUID
    marker: str
    marker_file: Path

    def hostile(self) -> dict[str, Any]:
        return {
            "command": f"touch {self.marker_file}",
            "env": {"SUPABASE_JWT_SECRET": self.marker, "TENANTFLOW_INJECTED": self.marker},
            "working_dir": str(self.marker_file.parent),
        }


@pytest.fixture
async def probe(stack: Stack, tmp_path: Path) -> AsyncIterator[Probe]:
    """A deployment of the probe flow on the stack's pool, in a project folder of its own."""
    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "probe.py").write_text(FLOW)
    # The worker's OS user must reach the flow (pytest's folders are private to root).
    grant_traversal(project / "flows")
    marker = f"tenantflow-marker-{uuid.uuid4().hex[:12]}"
    # NOTE: where the worker's OS user could write, had the command run.
    marker_file = Path(tempfile.gettempdir()) / marker
    async with get_client() as client:
        flow_id = await client.create_flow_from_name("tenantflow-lock-probe")
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=f"lock-probe-{marker[-12:]}",
            entrypoint="flows/probe.py:probe",
            work_pool_name=POOL,
            pull_steps=[
                {"tenantflow.deployments.set_project_directory": {"directory": str(project)}}
            ],
            parameter_openapi_schema={
                "type": "object",
                "properties": {"marker": {"type": "string"}},
            },
        )
    try:
        yield Probe(deployment_id, flow_id, marker, marker_file)
    finally:
        async with get_client() as client:
            for run in await _runs(client, deployment_id):
                await client.delete_flow_run(run.id)
            await client.delete_deployment(deployment_id)
            await client.delete_flow(flow_id)
        assert not marker_file.exists()


async def _runs(client: PrefectClient, deployment_id: UUID) -> list[Any]:
    runs: list[Any] = await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )
    return runs


async def _finish(client: PrefectClient, run_id: UUID) -> Any:
    async with asyncio.timeout(150):
        while True:
            run = await client.read_flow_run(run_id)
            if run.state_type in TERMINAL:
                return run
            await asyncio.sleep(0.5)


async def _seen(client: PrefectClient, run_id: UUID) -> dict[str, Any]:
    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    )
    (artifact,) = [a for a in artifacts if a.key == "lock-probe"]
    seen: dict[str, Any] = json.loads(str(artifact.data))
    return seen


def _assert_locked(seen: dict[str, Any], probe: Probe, stack: Stack) -> None:
    python = str(stack.config.project_dir / ".venv" / "bin" / "python")
    assert seen["argv"][1:] == ["-m", "prefect.engine"], seen["argv"]
    assert Path(seen["argv"][0]).resolve() == Path(python).resolve()
    assert seen["marker_in_env"] is False
    assert seen["jwt_secret_set"] is False
    if os.geteuid() == 0:
        worker_uid = pwd.getpwnam("tenantflow").pw_uid
        assert (seen["uid"], seen["euid"]) == (worker_uid, worker_uid)
    else:
        assert seen["uid"] == os.getuid()
    assert not probe.marker_file.exists()


async def test_the_server_refuses_command_and_env(stack: Stack, probe: Probe) -> None:
    async with get_client() as client:
        for variables in (
            {"command": f"touch {probe.marker_file}"},
            {"env": {"SUPABASE_JWT_SECRET": probe.marker}},
            {"working_dir": str(probe.marker_file.parent)},
            {"image": "evil"},
        ):
            with pytest.raises(PrefectHTTPStatusError) as refused:
                await client.create_flow_run_from_deployment(
                    probe.deployment_id,
                    parameters={"marker": probe.marker},
                    job_variables=variables,
                )
            assert refused.value.response.status_code == 422, variables
        # A deployment may not carry them either.
        with pytest.raises(PrefectHTTPStatusError) as refused:
            await client.create_deployment(
                flow_id=probe.flow_id,
                name=f"hostile-{probe.marker[-12:]}",
                entrypoint="flows/probe.py:probe",
                work_pool_name=POOL,
                job_variables={"command": f"touch {probe.marker_file}"},
            )
        assert refused.value.response.status_code == 422
        assert await _runs(client, probe.deployment_id) == []
    assert not probe.marker_file.exists()


async def test_stored_hostile_job_variables_do_not_reach_the_flow_run(
    stack: Stack, probe: Probe
) -> None:
    hostile = probe.hostile()
    async with get_client() as client:
        # 1. POST /flow_runs/ with a work pool stores job variables unvalidated.
        async with httpx.AsyncClient(timeout=10) as http:
            created = await http.post(
                f"{stack.config.prefect_api_url}/flow_runs/",
                json={
                    "flow_id": str(probe.flow_id),
                    "deployment_id": str(probe.deployment_id),
                    "work_pool_name": POOL,
                    "work_queue_name": "default",
                    "parameters": {"marker": probe.marker},
                    "job_variables": hostile,
                    "state": {"type": "SCHEDULED", "name": "Scheduled"},
                },
                headers=stack.config.prefect_api_headers(),
            )
        assert created.status_code == 201, created.text
        stored = UUID(created.json()["id"])
        assert (await client.read_flow_run(stored)).job_variables == hostile
        done = await _finish(client, stored)
        assert done.state_type == StateType.COMPLETED, done.state
        _assert_locked(await _seen(client, stored), probe, stack)

        # 2. The pool's template widened through the API: the server now takes them.
        pool = await client.read_work_pool(POOL)
        original = pool.base_job_template
        widened = json.loads(json.dumps(original))
        for key in LOCKED_VARIABLES:
            widened["job_configuration"][key] = "{{ " + key + " }}"
            widened["variables"]["properties"][key] = {}
        widened["variables"].pop("additionalProperties", None)
        try:
            await client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=widened))
            run = await client.create_flow_run_from_deployment(
                probe.deployment_id, parameters={"marker": probe.marker}, job_variables=hostile
            )
            done = await _finish(client, run.id)
            assert done.state_type == StateType.COMPLETED, done.state
            _assert_locked(await _seen(client, run.id), probe, stack)
        finally:
            await client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=original))
        assert (await client.read_work_pool(POOL)).base_job_template == original
    assert not probe.marker_file.exists()
