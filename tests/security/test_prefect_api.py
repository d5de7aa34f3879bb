"""Who can reach the stack's Prefect API: nobody without its auth string, no other web page.

Raw HTTP, as an attacker would send it: every refused request must leave no flow run.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from tenantflow_dev import Stack

pytestmark = [pytest.mark.stack]

EVIL = "http://evil.example"


def _count_runs(stack: Stack, deployment_id: str) -> int:
    response = httpx.post(
        f"{stack.config.prefect_api_url}/flow_runs/count",
        json={"deployments": {"id": {"any_": [deployment_id]}}},
        headers=stack.config.prefect_api_headers(),
        timeout=10,
    )
    response.raise_for_status()
    count: int = response.json()
    return count


def deployment_of(stack: Stack, name: str = "migrate") -> dict[str, Any]:
    """The project's deployment `name` as the API returns it."""
    response = httpx.get(
        f"{stack.config.prefect_api_url}/deployments/name/{name}/{name}",
        headers=stack.config.prefect_api_headers(),
        timeout=10,
    )
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


def _basic(value: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(value.encode()).decode()}


def test_the_api_wants_the_auth_string(stack: Stack) -> None:
    api = stack.config.prefect_api_url
    deployment = deployment_of(stack)
    before = _count_runs(stack, deployment["id"])
    user = stack.config.secrets.prefect_auth_string.split(":", 1)[0]
    wrong = [
        {},
        _basic(f"{user}:not-the-password"),
        _basic(stack.config.secrets.prefect_auth_string + "x"),
        {"Authorization": "Bearer " + stack.config.secrets.prefect_auth_string},
    ]
    for headers in wrong:
        reads = [
            httpx.post(f"{api}/flow_runs/filter", json={}, headers=headers, timeout=10),
            httpx.get(f"{api}/deployments/{deployment['id']}", headers=headers, timeout=10),
            httpx.get(f"{api}/admin/version", headers=headers, timeout=10),
        ]
        creates = [
            httpx.post(
                f"{api}/deployments/{deployment['id']}/create_flow_run",
                json={"parameters": {"dry_run": True}},
                headers=headers,
                timeout=10,
            ),
            httpx.post(
                f"{api}/flow_runs/",
                json={"flow_id": deployment["flow_id"], "deployment_id": deployment["id"]},
                headers=headers,
                timeout=10,
            ),
        ]
        assert [r.status_code for r in reads + creates] == [401] * 5, headers
    assert _count_runs(stack, deployment["id"]) == before
    # Probes (`/api/health`) answer without auth, and say nothing more.
    health = httpx.get(f"{api}/health", timeout=10)
    assert (health.status_code, health.json()) == (200, True)
    # The stack's own clients authenticate.
    ok = httpx.get(f"{api}/admin/version", headers=stack.config.prefect_api_headers(), timeout=10)
    assert ok.status_code == 200


def test_no_other_web_page_may_call_the_api(stack: Stack) -> None:
    api = stack.config.prefect_api_url
    ui = stack.config.prefect_ui_url
    deployment = deployment_of(stack)
    before = _count_runs(stack, deployment["id"])
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    evil = httpx.options(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        headers={"Origin": EVIL, **preflight},
        timeout=10,
    )
    assert evil.headers.get("access-control-allow-origin") not in (EVIL, "*")
    assert evil.status_code >= 400
    # A simple (non-preflighted) request from that page gets no CORS grant either.
    simple = httpx.get(f"{api}/health", headers={"Origin": EVIL}, timeout=10)
    assert simple.headers.get("access-control-allow-origin") not in (EVIL, "*")
    # The UI's own origin is allowed.
    own = httpx.options(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        headers={"Origin": ui, **preflight},
        timeout=10,
    )
    assert own.status_code == 200
    assert own.headers.get("access-control-allow-origin") == ui
    assert _count_runs(stack, deployment["id"]) == before


def test_the_ui_asks_for_basic_auth(stack: Stack) -> None:
    """The UI's settings tell the browser to show its login form."""
    response = httpx.get(f"{stack.config.prefect_ui_url}/ui-settings", timeout=10)
    assert response.status_code == 200
    assert response.json()["auth"] == "BASIC"
