"""`tenantflow.launch`: runs started as the SaaS backend starts them, executed by the stack's
worker, and followed to their final state."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import LogSort

from tenantflow import launch
from tenantflow.launch import LaunchError, run_url, start_run, watch_run
from tenantflow.sealing import public_key
from tests.world import World

pytestmark = [pytest.mark.stack]

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _key(world: World) -> str:
    return public_key(world.stack.config.secrets.seal_private_key)


def _period() -> dict[str, str]:
    today = datetime.now(UTC).date()
    return {"period_start": str(today - timedelta(days=1)), "period_end": str(today)}


async def _runs_of(deployment: str) -> set[Any]:
    async with get_client() as client:
        [found] = await client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
        )
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[found.id]))
        )
    return {run.id for run in runs}


@pytest.mark.slow
async def test_a_member_starts_a_report_and_watches_it_complete(world: World) -> None:
    token = await world.token("member_a")
    client_id = world.clients["a"]
    period = _period()

    run_id = await start_run(
        "client-report",
        access_token=token,
        public_key=_key(world),
        client_ids=[client_id],
        parameters=period,
    )

    async with get_client() as client:
        run = await client.read_flow_run(run_id)
    # Returned at once: the worker has not finished it yet.
    assert run.state is not None and run.state.type.value not in FINAL
    assert run.parameters["client_id"] == str(client_id)
    assert {k: run.parameters[k] for k in period} == period
    sealed = run.parameters["access_token"]
    assert token not in str(run.parameters) and sealed.count(".") == 4

    lines: list[str] = []
    outcome = await watch_run(run_id, printer=lines.append, poll_s=0.5)

    assert outcome.completed, (outcome, lines)
    assert (outcome.state_type, outcome.state_name) == ("COMPLETED", "Completed")
    states = [line for line in lines if line.startswith("state: ")]
    assert states[-1] == "state: Completed"
    assert "state: Running" in states and len(states) == len(set(states))
    # Every log line of the run, each once, in the order logged.
    printed = [line for line in lines if not line.startswith(("state: ", "artifact "))]
    async with get_client() as client:
        stored = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
            sort=LogSort.TIMESTAMP_ASC,
        )
    assert Counter(printed) == Counter(
        f"{log.timestamp:%H:%M:%S} {logging.getLevelName(log.level):<7} {log.message}"
        for log in stored
    )
    submitted = next(i for i, line in enumerate(printed) if "submitting flow run" in line)
    reported = next(i for i, line in enumerate(printed) if "events for guard-a-" in line)
    assert submitted < reported
    assert outcome.url == run_url(run_id) and outcome.url.endswith(f"/runs/flow-run/{run_id}")
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    ours = {a.id for a in artifacts}
    assert len(outcome.artifact_urls) == len(ours) == 2
    assert {url.rsplit("/", 1)[1] for url in outcome.artifact_urls} == {str(a) for a in ours}
    assert all("/artifacts/artifact/" in url for url in outcome.artifact_urls)
    assert sum(line.startswith("artifact client-report") for line in lines) == 2
    assert not any(token in line or sealed in line for line in lines)


@pytest.mark.slow
async def test_a_member_cannot_start_the_rollup_and_the_watch_says_why(world: World) -> None:
    token = await world.token("member_a")
    day = str(datetime.now(UTC).date() - timedelta(days=1))

    run_id = await start_run(
        "nightly-rollup",
        access_token=token,
        public_key=_key(world),
        client_ids=[world.clients["a"]],
        parameters={"day": day},
    )
    lines: list[str] = []
    outcome = await watch_run(run_id, printer=lines.append, poll_s=0.5)

    assert not outcome.completed
    assert outcome.state_type == "FAILED", (outcome, lines)
    assert outcome.message and "\n" not in outcome.message
    assert "operator" in outcome.message.lower()
    assert lines.count(f"state: {outcome.state_name}: {outcome.message}") == 1
    assert token not in outcome.message


async def test_an_unknown_deployment_is_refused_in_one_line(world: World) -> None:
    token = await world.token("member_a")
    for name in ("no-such-deployment", "client-report/no-such", "client-report/noop"):
        with pytest.raises(LaunchError) as refused:
            await start_run(name, access_token=token, public_key=_key(world))
        message = str(refused.value)
        assert message.startswith("unknown deployment"), message
        assert "\n" not in message and token not in message


async def test_a_malformed_parameter_is_named_without_its_value(world: World) -> None:
    token = await world.token("member_a")
    before = await _runs_of("client-report")
    cases = [
        ({"period_start": "2026-11-01", "period_end": "notadate"}, "period_end: not a valid date"),
        ({"period_start": "2026-11-01"}, "period_end: required"),
        ({"period_start": "2026-11-01", "period_end": "2026-11-02", "colour": "x"}, "colour"),
    ]
    for parameters, reason in cases:
        with pytest.raises(LaunchError) as refused:
            await start_run(
                "client-report",
                access_token=token,
                public_key=_key(world),
                client_ids=[world.clients["a"]],
                parameters=parameters,
            )
        message = str(refused.value)
        assert reason in message and "\n" not in message, message
        assert token not in message and "eyJ" not in message and "notadate" not in message
    with pytest.raises(LaunchError, match="exactly one client"):
        await start_run(
            "client-report", access_token=token, public_key=_key(world), parameters=_period()
        )
    with pytest.raises(LaunchError, match=r"day: not a valid date"):
        await start_run(
            "nightly-rollup",
            access_token=token,
            public_key=_key(world),
            parameters={"day": "yesterday-ish"},
        )
    assert await _runs_of("client-report") == before


async def test_a_bad_auth_string_is_one_line(world: World) -> None:
    token = await world.token("member_a")
    async with get_client() as good:
        api = str(good.api_url)
    async with PrefectClient(api, auth_string="tenantflow:not-the-password") as client:
        with pytest.raises(LaunchError) as refused:
            await start_run(
                "client-report",
                access_token=token,
                public_key=_key(world),
                client_ids=[world.clients["a"]],
                parameters=_period(),
                client=client,
            )
    message = str(refused.value)
    assert "refused the auth string (401)" in message and "\n" not in message, message
    assert token not in message and "not-the-password" not in message


async def test_without_prefect_yaml_the_api_deployment_and_its_schema_decide(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # A backend that ships no project: no TENANTFLOW_PROJECT_DIR, no checkout beside it.
    monkeypatch.delenv("TENANTFLOW_PROJECT_DIR", raising=False)
    monkeypatch.setattr(launch, "_checkout", lambda: tmp_path)
    token = await world.token("member_a")
    with pytest.raises(LaunchError, match="period_end: not a valid date"):
        await start_run(
            "client-report",
            access_token=token,
            public_key=_key(world),
            client_ids=[world.clients["a"]],
            parameters={"period_start": "2026-11-01", "period_end": "notadate"},
        )
    with pytest.raises(LaunchError, match=r"^unknown deployment no-such"):
        await start_run("no-such", access_token=token, public_key=_key(world))
