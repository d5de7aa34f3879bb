"""A plain access token refused by the Prefect server is never repeated in the refusal.

Whoever pastes a plain JWT into a run form (or sends it to the API) is told what was
expected; the refusal travels to the UI, to the caller's logs and exception text, so it
must not carry the token. Raw HTTP against the stack's server, with its real deployments.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tenantflow.tenancy.run_token import SCHEMA_EXPECTED
from tenantflow_dev import Stack
from tests.security.test_prefect_api import deployment_of
from tests.world import World

pytestmark = [pytest.mark.stack]


def _api(stack: Stack, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.request(
        method,
        f"{stack.config.prefect_api_url}{path}",
        json=body,
        headers=stack.config.prefect_api_headers(),
        timeout=10,
    )


def _assert_not_echoed(text: str, token: str) -> None:
    for part in token.split("."):
        assert part not in text


@pytest.mark.parametrize("name", ["client-report", "nightly-rollup", "migrate"])
async def test_a_run_with_a_plain_token_is_refused_without_repeating_it(
    stack: Stack, world: World, name: str
) -> None:
    token = await world.token("operator", operator=True)
    deployment = deployment_of(stack, name)
    parameters = {
        "client_id": str(world.clients["a"]),
        "period_start": "2026-11-01",
        "period_end": "2026-11-30",
    }
    if name != "client-report":
        parameters = {}
    body = {"parameters": {**parameters, "access_token": token}}
    created = _api(stack, "POST", f"/deployments/{deployment['id']}/create_flow_run", body)
    assert created.status_code == 409, created.text
    assert SCHEMA_EXPECTED in created.text
    _assert_not_echoed(created.text, token)
    # The run form validates through the UI's endpoint: the same answer.
    checked = _api(
        stack,
        "POST",
        "/ui/schemas/validate",
        {"schema": deployment["parameter_openapi_schema"], "values": body["parameters"]},
    )
    assert checked.status_code == 200 and checked.json()["valid"] is False
    assert SCHEMA_EXPECTED in checked.text
    _assert_not_echoed(checked.text, token)


async def test_a_sealed_value_passes_the_schema(stack: Stack, world: World) -> None:
    sealed = await world.sealed("operator", flow="migrate", clients=None, operator=True)
    deployment = deployment_of(stack, "migrate")
    checked = _api(
        stack,
        "POST",
        "/ui/schemas/validate",
        {"schema": deployment["parameter_openapi_schema"], "values": {"access_token": sealed}},
    )
    assert checked.status_code == 200 and checked.json()["valid"] is True, checked.text
