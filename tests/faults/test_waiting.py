"""A run that waits longer than its sealed token lives is refused, saying so."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Scheduled

from tests.world import World

pytestmark = [pytest.mark.stack, pytest.mark.slow]


async def test_a_token_that_expired_in_the_queue_is_refused_clearly(world: World) -> None:
    # NOTE: the worker tolerates AUTH_LEEWAY_S (10 s) of clock skew past `exp`.
    today = datetime.now(UTC).date()
    period = {"period_start": str(today), "period_end": str(today)}
    sealed = await world.sealed(
        "member_a", flow="client-report", clients=["a"], parameters=period, ttl_s=1
    )
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("client-report/client-report")
        run = await client.create_flow_run_from_deployment(
            deployment.id,
            parameters={"client_id": str(world.clients["a"]), **period, "access_token": sealed},
            state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(seconds=14)),
        )
        async with asyncio.timeout(120):
            while True:
                stored = await client.read_flow_run(run.id)
                if stored.state and stored.state.is_final():
                    break
                await asyncio.sleep(0.25)
    assert stored.state.is_failed(), stored.state
    message = stored.state.message or ""
    assert "sealed access token refused" in message and "expired" in message
    assert "seal a fresh one" in message
    reports = await world.sql(
        "fetchval", "SELECT count(*) FROM public.client_reports WHERE flow_run_id = $1", run.id
    )
    assert reports == 0
