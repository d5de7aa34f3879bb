"""Job variables cannot change what a flow run runs, through the real server and worker.

The server refuses a deployment run asking for `command` or `env` (the pool's template
names no such variable and refuses unknown ones). Two ways still store such job
variables: `POST /flow_runs/` with a work pool (the server does not validate job
variables there) and a pool template widened through the API. Runs made both ways go
through the stack's worker carrying the attack itself (a command, and a JWT secret of
the attacker's that would make a self-signed token verify); the worker runs the declared
flow with its own environment, and the guard refuses the token. A deployment made
through the API (its own entrypoint and pull steps) never starts at all.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import jwt
import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import PrefectHTTPStatusError

from tenantflow.deployments import WORK_POOLS
from tenantflow.worker import LOCKED_VARIABLES
from tenantflow_dev import Stack
from tenantflow_dev.os_users import grant_traversal
from tests.world import World, world

__all__ = ["world"]

pytestmark = [pytest.mark.stack, pytest.mark.slow]

POOL = WORK_POOLS["process"]
FLOW = '''"""A flow no run may ever start: its deployment is not the project's."""
from pathlib import Path

from prefect import flow


@flow(name="tenantflow-lock-probe", persist_result=False)
def probe(marker: str) -> None:
    Path("/tmp", marker).touch()
'''
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


@dataclass
class Probe:
    deployment_id: UUID
    flow_id: UUID
    marker: str
    marker_file: Path


@pytest.fixture
async def probe(stack: Stack, tmp_path: Path) -> AsyncIterator[Probe]:
    """A deployment of the probe flow on the stack's pool, in a project folder of its own."""
    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "probe.py").write_text(FLOW)
    # The worker's OS user must reach the flow (pytest's folders are private to root).
    grant_traversal(project / "flows")
    marker = f"tenantflow-marker-{uuid.uuid4().hex[:12]}"
    # NOTE: where the worker's OS user could write, had anything of this deployment run.
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


async def test_a_deployment_the_project_does_not_declare_never_starts(
    stack: Stack, probe: Probe
) -> None:
    """Deployments (entrypoint, pull steps) can be made through the API; the worker runs
    only what its own prefect.yaml declares, and refuses before starting a process."""
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            probe.deployment_id, parameters={"marker": probe.marker}
        )
        done = await _finish(client, run.id)
    assert done.state_type == StateType.CRASHED, done.state
    assert "is not declared" in (done.state.message or "")
    assert done.infrastructure_pid is None
    assert not probe.marker_file.exists()


def _self_signed_member_token(stack: Stack, world: World, secret: str) -> str:
    """What an attacker who could set SUPABASE_JWT_SECRET on the worker would send."""
    now = int(time.time())
    claims = {
        "iss": f"{stack.config.supabase_url}/auth/v1",
        "aud": "authenticated",
        "role": "authenticated",
        "sub": str(world.users["member_a"]),
        "iat": now,
        "exp": now + 600,
        "session_id": str(uuid.uuid4()),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


async def test_stored_hostile_job_variables_do_not_reach_the_flow_run(
    stack: Stack, world: World, tmp_path: Path
) -> None:
    """The attack itself: a run that sets `command` and `SUPABASE_JWT_SECRET` on the worker.

    Had the environment reached the flow, the self-signed token would verify and the
    report would complete; had the command run, the marker file would exist.
    """
    secret = uuid.uuid4().hex * 2
    marker_file = Path(tempfile.gettempdir()) / f"tenantflow-marker-{uuid.uuid4().hex[:12]}"
    hostile = {
        "command": f"touch {marker_file}",
        "env": {"SUPABASE_JWT_SECRET": secret, "AUTH_STRICT": "false"},
        "working_dir": str(tmp_path),
    }
    today = datetime.now(UTC).date()
    period = {"period_start": str(today), "period_end": str(today)}

    def parameters() -> dict[str, Any]:
        token = _self_signed_member_token(stack, world, secret)
        return {
            "client_id": str(world.clients["a"]),
            **period,
            "access_token": world.seal(
                token, flow="client-report", clients=["a"], parameters=period
            ),
        }

    async with get_client() as client:
        deployment = await client.read_deployment_by_name("client-report/client-report")
        # 1. POST /flow_runs/ with a work pool stores job variables unvalidated.
        async with httpx.AsyncClient(timeout=10) as http:
            created = await http.post(
                f"{stack.config.prefect_api_url}/flow_runs/",
                json={
                    "flow_id": str(deployment.flow_id),
                    "deployment_id": str(deployment.id),
                    "work_pool_name": POOL,
                    "work_queue_name": "default",
                    "parameters": parameters(),
                    "job_variables": hostile,
                    "state": {"type": "SCHEDULED", "name": "Scheduled"},
                },
                headers=stack.config.prefect_api_headers(),
            )
        assert created.status_code == 201, created.text
        stored = UUID(created.json()["id"])
        assert (await client.read_flow_run(stored)).job_variables == hostile
        runs = [stored]

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
                deployment.id, parameters=parameters(), job_variables=hostile
            )
            runs.append(run.id)
            finished = [await _finish(client, run_id) for run_id in runs]
        finally:
            await client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=original))
        assert (await client.read_work_pool(POOL)).base_job_template == original
    for done in finished:
        # The worker ran the declared flow, whose guard refused the forged token (the
        # seal itself, made for exactly this run, opened).
        message = done.state.message or ""
        assert done.state_type == StateType.FAILED, done.state
        assert "access token refused" in message, message
        assert "sealed access token refused" not in message, message
    assert not marker_file.exists()
    reports = await world.sql(
        "fetchval",
        "SELECT count(*) FROM public.client_reports WHERE flow_run_id = ANY($1::uuid[])",
        runs,
    )
    assert reports == 0
