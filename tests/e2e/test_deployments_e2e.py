"""End to end: `prefect deployment run` of each deployment, executed by the stack's worker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import FlowRun

from tenantflow.migrate import script_directory
from tenantflow.tenancy import REDACTED
from tests.tenancy.conftest import EVENTS_PER_CLIENT, World

pytestmark = [pytest.mark.stack, pytest.mark.slow]

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


async def _deployment_run(name: str, parameters: dict[str, Any]) -> uuid.UUID:
    """`prefect deployment run NAME --params -`: parameters on stdin, never in argv."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deployment",
        "run",
        name,
        "--params",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, _ = await proc.communicate(json.dumps(parameters, default=str).encode())
    text = out.decode()
    assert proc.returncode == 0, text
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", text)
    assert found, text
    return uuid.UUID(found.group(1))


async def _final(run_id: uuid.UUID, within: float = 180) -> FlowRun:
    deadline = asyncio.get_running_loop().time() + within
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(run_id)
            if run.state and run.state.type.value in FINAL:
                return run
            assert asyncio.get_running_loop().time() < deadline, f"{run_id}: {run.state}"
            await asyncio.sleep(1)


async def _artifacts(run_id: uuid.UUID) -> list[Any]:
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )


async def test_every_deployment_through_the_worker(world: World) -> None:
    today = datetime.now(UTC).date()
    operator, member_a, member_b = (
        await world.token("operator"),
        await world.token("member_a"),
        await world.token("member_b"),
    )
    clients = [str(world.clients["a"]), str(world.clients["b"])]
    report = {"client_id": str(world.clients["a"]), "period_start": today - timedelta(days=1)}
    report["period_end"] = today
    runs = {
        "migrate": await _deployment_run("migrate/migrate", {}),
        "rollup": await _deployment_run(
            "nightly-rollup/nightly-rollup",
            {"day": today, "client_ids": clients, "access_token": operator},
        ),
        "report": await _deployment_run(
            "client-report/client-report", {**report, "access_token": member_a}
        ),
        "report_outsider": await _deployment_run(
            "client-report/client-report", {**report, "access_token": member_b}
        ),
    }
    final = dict(zip(runs, await asyncio.gather(*(_final(r) for r in runs.values())), strict=True))
    states = {name: run.state.type.value for name, run in final.items()}
    assert states == {
        "migrate": "COMPLETED",
        "rollup": "COMPLETED",
        "report": "COMPLETED",
        "report_outsider": "FAILED",
    }, {name: run.state.message for name, run in final.items()}
    assert "has no membership" in final["report_outsider"].state.message
    for name in ("rollup", "report", "report_outsider"):
        assert final[name].parameters["access_token"] == REDACTED
        assert final[name].run_count == 1  # refusals are not retried

    conn = await world.admin()
    try:
        metrics = await conn.fetch(
            "SELECT client_id, events, revenue FROM public.client_daily_metrics "
            "WHERE client_id = ANY($1::uuid[]) AND day = $2",
            [world.clients["a"], world.clients["b"]],
            today,
        )
        reports = await conn.fetch(
            "SELECT client_id, requested_by, totals FROM public.client_reports "
            "WHERE flow_run_id = ANY($1::uuid[])",
            [runs["report"], runs["report_outsider"]],
        )
        version = await conn.fetchval("SELECT version_num FROM public.alembic_version")
    finally:
        await conn.close()
    expected = await world.day_totals([world.clients["a"], world.clients["b"]], today)
    assert {row["client_id"]: (row["events"], row["revenue"]) for row in metrics} == expected
    assert [(r["client_id"], r["requested_by"]) for r in reports] == [
        (world.clients["a"], world.users["member_a"])
    ]
    assert json.loads(reports[0]["totals"])["events"] == EVENTS_PER_CLIENT
    assert version == script_directory().get_current_head()

    report_artifacts = await _artifacts(runs["report"])
    assert {a.type for a in report_artifacts} >= {"markdown", "table"}
    rollup_artifacts = await _artifacts(runs["rollup"])
    table = next(a for a in rollup_artifacts if a.type == "table")
    assert len(json.loads(table.data)) == 2
    for run_id in runs.values():
        for artifact in await _artifacts(run_id):
            assert operator not in str(artifact.data) and member_a not in str(artifact.data)
