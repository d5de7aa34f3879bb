"""The flows run in-process against the stack's Prefect server: guard first, no leaks."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, date, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from flows.client_report import client_report
from flows.nightly_rollup import nightly_rollup
from tenantflow.db import dispose_engines
from tests.world import EVENTS_PER_CLIENT, World

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("db_limit")]

TENANT_DATA_TABLES = ("client_events", "client_daily_metrics", "client_reports")


@pytest.fixture(autouse=True)
async def _dispose() -> AsyncIterator[None]:
    yield
    await dispose_engines()


async def _everything_stored_about(run_id: uuid.UUID) -> str:
    """Parameters, state message, logs and artifacts of a run, as one text."""
    async with get_client() as client:
        # Logs reach the API in batches: wait for the run's last line.
        for _ in range(100):
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            )
            if any("Finished in state" in log.message for log in logs):
                break
            await asyncio.sleep(0.2)
        run = await client.read_flow_run(run_id)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    parts = [
        json.dumps(run.parameters, default=str),
        (run.state.message or "") if run.state else "",
        *(log.message for log in logs),
        *(json.dumps(a.data, default=str) + (a.description or "") for a in artifacts),
        *(json.dumps(t.task_inputs, default=str) + (t.state.message or "") for t in task_runs),
    ]
    assert logs, "no logs were stored for the run"
    return "\n".join(parts)


async def test_client_report_as_a_member(world: World) -> None:
    token = await world.token("member_a")
    today = datetime.now(UTC).date()
    period = {"period_start": today - timedelta(days=2), "period_end": today}
    state = await client_report(
        client_id=world.clients["a"],
        **period,
        access_token=world.seal(token, flow="client-report", clients=["a"], parameters=period),
        return_state=True,
    )
    assert state.is_completed(), state.message
    result = await state.aresult()
    assert result["events"] == EVENTS_PER_CLIENT
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    stored = await _everything_stored_about(run_id)
    assert token not in stored and token.split(".")[2] not in stored
    assert token not in json.dumps(result)
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    markdown = next(a for a in artifacts if a.type == "markdown")
    assert f"Events: **{EVENTS_PER_CLIENT}**" in markdown.data
    stored_report = await world.sql(
        "fetchrow",
        "SELECT requested_by, flow_run_id, totals FROM public.client_reports WHERE id = $1",
        uuid.UUID(str(result["report_id"])),
    )
    assert stored_report["requested_by"] == world.users["member_a"]
    assert stored_report["flow_run_id"] == run_id
    assert json.loads(stored_report["totals"])["events"] == EVENTS_PER_CLIENT


async def _tenant_statements(world: World) -> list[str]:
    rows = await world.sql(
        "fetch",
        "SELECT query FROM pg_stat_statements WHERE "
        + " OR ".join(f"query ILIKE '%{table}%'" for table in TENANT_DATA_TABLES),
    )
    return [row["query"] for row in rows if "pg_stat_statements" not in row["query"]]


async def _reset_statements(world: World) -> None:
    await world.sql("execute", "SELECT pg_stat_statements_reset()")


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("member_b", "has no membership"),
        ("forged", "access token refused"),
        ("plain", "plain access token"),
        ("other_client", "sealed access token refused"),
    ],
)
async def test_a_denied_run_fails_before_any_tenant_query(
    world: World, who: str, reason: str
) -> None:
    token = await world.token("member_b" if who == "member_b" else "member_a")
    if who == "forged":
        token = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    today = datetime.now(UTC).date()
    period = {"period_start": today, "period_end": today}
    value = world.seal(
        token,
        flow="client-report",
        clients=["b" if who == "other_client" else "a"],
        parameters=period,
    )
    if who == "plain":
        value = token
    await _reset_statements(world)
    state = await client_report(
        client_id=world.clients["a"],
        **period,
        access_token=value,
        return_state=True,
    )
    assert state.is_failed()
    assert reason in state.message
    assert await _tenant_statements(world) == []
    assert state.state_details.flow_run_id is not None
    stored = await _everything_stored_about(state.state_details.flow_run_id)
    assert token not in stored and token.split(".")[2] not in stored and reason in stored


async def test_the_statement_probe_does_see_tenant_queries(world: World) -> None:
    await _reset_statements(world)
    today = datetime.now(UTC).date()
    period = {"period_start": today, "period_end": today}
    state = await client_report(
        client_id=world.clients["a"],
        **period,
        access_token=await world.sealed(
            "member_a", flow="client-report", clients=["a"], parameters=period
        ),
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert any("client_events" in q for q in await _tenant_statements(world))


@pytest.mark.parametrize(
    ("start", "end", "reason"),
    [
        (0, -3, "is before period_start"),
        (-800, 0, "at most 366 are allowed"),
        (-1, None, "is after"),
        (None, 0, "is before 2000-01-01"),
    ],
)
async def test_a_bad_period_fails_clearly_and_keeps_the_seal(
    world: World, start: int | None, end: int | None, reason: str
) -> None:
    today = datetime.now(UTC).date()
    period = {
        "period_start": date(1999, 12, 31) if start is None else today + timedelta(days=start),
        "period_end": date(9999, 12, 31) if end is None else today + timedelta(days=end),
    }
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"], parameters=period)
    state = await client_report(
        client_id=world.clients["a"],
        **period,
        access_token=sealed,
        return_state=True,
    )
    assert state.is_failed() and reason in state.message, state.message
    # Checked before the guard: the seal was not used up, the user may correct and retry.
    used = await world.sql(
        "fetchval",
        "SELECT count(*) FROM tenantflow_private.sealed_token_uses WHERE flow_run_id = $1",
        state.state_details.flow_run_id,
    )
    assert used == 0


async def test_nightly_rollup_by_an_operator_is_idempotent(world: World) -> None:
    day = datetime.now(UTC).date()
    clients = [world.clients["a"], world.clients["b"]]

    async def metrics() -> list[tuple]:
        rows = await world.sql(
            "fetch",
            "SELECT client_id, day, events, revenue FROM public.client_daily_metrics "
            "WHERE client_id = ANY($1::uuid[]) ORDER BY client_id",
            clients,
        )
        return [tuple(r) for r in rows]

    def sealed() -> Awaitable[str]:
        return world.sealed_rollup(day, clients=["a", "b"])

    first = await nightly_rollup(day=day, client_ids=clients, access_token=await sealed())
    once = await metrics()
    second = await nightly_rollup(day=day, client_ids=clients, access_token=await sealed())
    expected = await world.day_totals(clients, day)
    assert first == second == {"clients": 2, "events": sum(e for e, _ in expected.values())}
    assert await metrics() == once
    assert {row[0]: (row[2], row[3]) for row in once} == expected
    assert all(row[1] == day for row in once)


async def test_nightly_rollup_by_hand_without_a_token_is_refused(world: World) -> None:
    state = await nightly_rollup(client_ids=[world.clients["a"]], return_state=True)
    assert state.is_failed()
    assert "no access_token" in state.message


async def test_one_failing_client_does_not_stop_the_others(world: World) -> None:
    """The run ends Failed naming the failed client and listing it for a rerun; the
    others are rolled up."""
    failing, fine = world.clients["a"], world.clients["b"]
    refuse = "RAISE EXCEPTION 'refused by a test trigger';"
    today = datetime.now(UTC).date()
    async with world.metrics_trigger(failing, refuse):
        state = await nightly_rollup(
            day=today,
            client_ids=[failing, fine],
            access_token=await world.sealed_rollup(today, clients=["a", "b"]),
            return_state=True,
        )
    rows = await world.sql(
        "fetch",
        "SELECT client_id FROM public.client_daily_metrics WHERE client_id = ANY($1::uuid[])",
        [failing, fine],
    )
    assert state.is_failed()
    assert "1 of 2 client(s) failed" in state.message and str(failing) in state.message
    assert str(fine) not in state.message
    assert [row["client_id"] for row in rows] == [fine]
    artifacts = await _artifacts_of(state.state_details.flow_run_id)
    table = json.loads(next(a for a in artifacts if a.type == "table").data)
    outcomes = {row["client"].rsplit("(", 1)[1].rstrip(")"): row["outcome"] for row in table}
    assert outcomes[str(fine)] == "ok"
    assert outcomes[str(failing)].startswith("failed: ")
    assert "refused by a test trigger" in outcomes[str(failing)]
    # NOTE: no SQL text or bound parameters leak into the artifact.
    assert "INSERT INTO" not in outcomes[str(failing)]
    # The failed ids, ready to paste into a new run's `client_ids`.
    listed = str(next(a for a in artifacts if a.key == "nightly-rollup-failed-clients").data)
    assert json.loads(listed.split("```json\n", 1)[1].split("\n```", 1)[0]) == [str(failing)]


async def _artifacts_of(run_id):
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
