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
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import Cancelled, Scheduled

from tenantflow.migrate import script_directory
from tenantflow.tenancy.run_token import SPENT
from tests.world import EVENTS_PER_CLIENT, World

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
            await asyncio.sleep(0.25)


async def _artifacts(run_id: uuid.UUID) -> list[Any]:
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )


async def _prefect_database_bytes(world: World) -> bytes:
    """Everything the Prefect server stores.

    On PostgreSQL: a data-only dump of its database `prefect`, as the cluster's superuser
    (runs, task runs, logs, artifacts, events, ...). On SQLite: its files, WAL included,
    as they are on disk.
    """
    config = world.stack.config
    if config.prefect_database == "sqlite":
        home = config.prefect_home
        return b"".join(p.read_bytes() for p in sorted(home.rglob("*.db*")) if p.is_file())
    proc = await asyncio.create_subprocess_exec(
        "/usr/lib/postgresql/15/bin/pg_dump",
        "--data-only",
        "--no-owner",
        f"--host={config.host}",
        f"--port={config.pg_port}",
        "--username=supabase_admin",
        "--dbname=prefect",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PGPASSWORD": config.secrets.admin_password},
    )
    dump, errors = await proc.communicate()
    assert proc.returncode == 0, errors.decode()
    assert b"COPY public.flow_run " in dump
    return dump


async def test_every_deployment_through_the_worker(world: World) -> None:
    today = datetime.now(UTC).date()
    tokens = {
        who: await world.token(who, operator=who == "operator")
        for who in ("operator", "member_a", "member_b")
    }
    clients = [str(world.clients["a"]), str(world.clients["b"])]
    period = {"period_start": today - timedelta(days=1), "period_end": today}
    report = {"client_id": str(world.clients["a"]), **period}
    runs = {
        "migrate": await _deployment_run(
            "migrate/migrate",
            {"access_token": world.seal(tokens["operator"], flow="migrate", clients=None)},
        ),
        "rollup": await _deployment_run(
            "nightly-rollup/nightly-rollup",
            {
                "day": today,
                "client_ids": clients,
                "access_token": world.seal(
                    tokens["operator"],
                    flow="nightly-rollup",
                    clients=["a", "b"],
                    parameters={"day": today},
                ),
            },
        ),
        "report": await _deployment_run(
            "client-report/client-report",
            {
                **report,
                "access_token": world.seal(
                    tokens["member_a"], flow="client-report", clients=["a"], parameters=period
                ),
            },
        ),
        "report_outsider": await _deployment_run(
            "client-report/client-report",
            {
                **report,
                "access_token": world.seal(
                    tokens["member_b"], flow="client-report", clients=["a"], parameters=period
                ),
            },
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
    for run in final.values():
        assert run.run_count == 1  # refusals are not retried
        assert isinstance(run.parameters["access_token"], str)
        for token in tokens.values():
            assert token.split(".")[2] not in json.dumps(run.parameters)

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
            for token in tokens.values():
                assert token.split(".")[2] not in str(artifact.data)
    # Prefect's own database never held a token, not even in its WAL.
    stored = await _prefect_database_bytes(world)
    assert stored, "the Prefect database files were not found"
    for token in tokens.values():
        assert token.split(".")[2].encode() not in stored
        assert token.split(".")[1].encode() not in stored


async def test_runs_that_never_start_hold_only_ciphertext(world: World) -> None:
    """Cancelled, scheduled for later, refused at creation: no token in Prefect at all."""
    token = await world.token("member_a")
    today = datetime.now(UTC).date()
    period = {"period_start": str(today), "period_end": str(today)}
    sealed = world.seal(token, flow="client-report", clients=["a"], parameters=period)
    parameters = {"client_id": str(world.clients["a"]), **period, "access_token": sealed}
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("client-report/client-report")
        later = await client.create_flow_run_from_deployment(
            deployment.id,
            parameters=parameters,
            state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(hours=6)),
        )
        cancelled = await client.create_flow_run_from_deployment(
            deployment.id,
            parameters=parameters,
            state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(hours=6)),
        )
        await client.set_flow_run_state(cancelled.id, Cancelled(), force=True)
        # A plain token pasted by mistake is refused by the deployment's parameter schema
        # before Prefect stores anything.
        with pytest.raises(PrefectHTTPStatusError) as refused:
            await client.create_flow_run_from_deployment(
                deployment.id, parameters={**parameters, "access_token": token}
            )
        assert refused.value.response.status_code in (409, 422)
        assert (await client.read_flow_run(later.id)).parameters["access_token"] == sealed
        # An ended run keeps the sealed value until the workers' housekeeping removes it.
        stored = await client.read_flow_run(cancelled.id)
        assert stored.parameters["access_token"] in (sealed, SPENT)
    stored_bytes = await _prefect_database_bytes(world)
    # What it does hold, the sealed value, is found there: the search reads parameters.
    assert sealed.encode() in stored_bytes
    assert token.split(".")[2].encode() not in stored_bytes
    assert token.split(".")[1].encode() not in stored_bytes
    async with get_client() as client:
        await client.delete_flow_run(later.id)


async def test_the_migrate_deployment_cannot_downgrade(world: World) -> None:
    # NOTE: sealed with the run's real parameters, so what stops the run is the
    # parameter itself, not a seal made for another run.
    downgrade = {"downgrade_to": "base"}
    sealed = world.seal(
        await world.token("operator", operator=True),
        flow="migrate",
        clients=None,
        parameters=downgrade,
    )
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("migrate/migrate")
        try:
            run = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"access_token": sealed, **downgrade}
            )
        except PrefectHTTPStatusError as refused:
            assert refused.response.status_code in (409, 422)
        else:
            # The flow has no such parameter: the run cannot even start its flow.
            final = await _final(run.id)
            assert final.state.type.value in {"FAILED", "CRASHED"}, final.state.message
    version = await world.sql("fetchval", "SELECT version_num FROM public.alembic_version")
    assert version == script_directory().get_current_head()
    assert await world.sql("fetchval", "SELECT to_regclass('public.clients') IS NOT NULL")
