"""`tenant_flow`: Prefect's `@flow` with the token's redaction hooks, and nothing else.

The flows' own hooks and the hook's redaction are checked in test_sealed.py; these check
the decorator: what it hands to Prefect, and a run of a flow built with it that fails
before its guard.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from tenantflow.db import dispose_engines
from tenantflow.tenancy import REDACTED, SealedAccessToken, redact_token_on_failure, tenant_flow
from tests.world import World


async def _report(day: int, access_token: SealedAccessToken | None = None) -> int:
    """A stand-in tenant flow.

    Args:
        day: A day.
        access_token: A sealed access token.
    """
    if day < 0:
        raise ValueError("a negative day, refused before the guard")
    return day


async def _after(flow: Any, flow_run: Any, state: Any) -> None:
    return None


def test_it_hands_prefect_the_function_itself() -> None:
    tenant = tenant_flow(name="t-report", timeout_seconds=60, description="d")(_report)
    plain = flow(name="t-report", timeout_seconds=60, description="d")(_report)
    assert tenant.fn is _report and inspect.signature(tenant) == inspect.signature(_report)
    assert tenant.parameters.model_dump() == plain.parameters.model_dump()
    assert (tenant.name, tenant.timeout_seconds, tenant.description) == ("t-report", 60, "d")
    assert (tenant.retries, tenant.persist_result) == (0, False)


def test_the_redaction_hook_runs_first_on_failure_crash_and_cancellation() -> None:
    tenant = tenant_flow(
        name="t-report", on_failure=[_after], on_crashed=[_after], on_cancellation=[_after]
    )(_report)
    assert tenant.on_failure_hooks == [redact_token_on_failure, _after]
    assert tenant.on_crashed_hooks == [redact_token_on_failure, _after]
    assert tenant.on_cancellation_hooks == [redact_token_on_failure, _after]
    assert tenant.on_completion_hooks == []


def test_a_flow_without_an_access_token_parameter_is_refused() -> None:
    async def no_token(day: int) -> int:
        return day

    with pytest.raises(TypeError, match="takes no access_token parameter"):
        tenant_flow(name="t-no-token")(no_token)


@pytest.mark.stack
async def test_a_run_that_fails_before_its_guard_loses_a_plain_token(world: World) -> None:
    token = await world.token("member_a")
    state = await tenant_flow(name="t-report")(_report)(
        day=-1, access_token=token, return_state=True
    )
    assert state.is_failed() and "before the guard" in (state.message or "")
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    async with get_client() as client:
        stored = (await client.read_flow_run(flow_run_id)).parameters
    assert stored == {"day": -1, "access_token": REDACTED}


@pytest.fixture(autouse=True)
async def _dispose() -> AsyncIterator[None]:
    yield
    await dispose_engines()
