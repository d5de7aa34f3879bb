"""The whole operator path as a person types it, against the stack's real parts.

`tenantflow login` (the password on standard input) → `tenantflow run DEPLOYMENT ...
--watch`: the run is sealed for exactly its parameters, started through the Prefect API,
executed by the stack's worker, followed to its end. The demo users of `make up` (their
printed passwords), on the demo client Acme; each test's runs are its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
)

from tenantflow.launch import start_run, watch_run
from tenantflow_dev import Stack
from tenantflow_dev.demo import ACME, DEMO_OPERATOR
from tests.operators.conftest import Operator

pytestmark = [pytest.mark.stack, pytest.mark.slow]

MEMBER = "alice@demo.tenantflow.test"


@pytest.fixture
def shell(operator: Operator, stack: Stack) -> Operator:
    """The operator's shell, with the Prefect API's address and auth string too."""
    config = stack.config
    operator.env["PREFECT_API_URL"] = config.prefect_api_url
    operator.env["PREFECT_API_AUTH_STRING"] = config.secrets.prefect_auth_string
    return operator


def _sign_in(shell: Operator, stack: Stack, email: str) -> None:
    shell.login(email, stack.config.secrets.demo_password(email))


def _period() -> list[str]:
    end = datetime.now(UTC).date()
    start = end - timedelta(days=6)
    return ["--param", f"period_start={start}", "--param", f"period_end={end}"]


async def test_a_member_signs_in_and_runs_a_report_to_completed(
    shell: Operator, stack: Stack
) -> None:
    started = time.monotonic()
    _sign_in(shell, stack, MEMBER)
    result = shell.run(
        "run", "client-report", "--client", str(ACME.id), *_period(), "--watch"
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("flow run ") and "/runs/flow-run/" in lines[0]
    assert any("Completed" in line for line in lines)
    assert any("/artifacts/artifact/" in line for line in lines)
    session = shell.session()
    for secret in (session["access_token"], session["refresh_token"]):
        assert secret not in result.stdout + result.stderr
    # A trivial flow's run on the same stack, started and followed the same way.
    noop_started = time.monotonic()
    run_id = await start_run("noop", access_token=None, public_key="{}")
    outcome = await watch_run(run_id, printer=lambda _: None)
    assert outcome.completed
    noop_seconds = time.monotonic() - noop_started
    sys.stderr.write(
        f"\nlogin -> run client-report --watch -> Completed: {seconds:.1f}s; "
        f"noop started and watched to Completed: {noop_seconds:.1f}s\n"
    )


async def test_nightly_rollup_runs_for_an_operator_and_is_refused_for_a_member(
    shell: Operator, stack: Stack, tmp_path: object
) -> None:
    day = str(datetime.now(UTC).date() - timedelta(days=1))
    _sign_in(shell, stack, DEMO_OPERATOR)
    rollup = ("run", "nightly-rollup", "--client", str(ACME.id), "--param", f"day={day}")
    result = shell.run(*rollup, "--watch")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert any("Completed" in line for line in result.stdout.splitlines())
    shell.ok("logout")
    _sign_in(shell, stack, MEMBER)
    # Refused before any run exists, in one line.
    asked = datetime.now(UTC)
    line = shell.refused(*rollup, "--watch")
    assert "nightly-rollup runs only for tenantflow operators" in line
    assert "tenantflow operator grant" in line
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("nightly-rollup/nightly-rollup")
        started = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(
                    after_=asked, before_=datetime.now(UTC)
                )
            ),
        )
    assert started == []


async def test_an_expired_access_token_is_refreshed_and_the_run_still_goes_through(
    shell: Operator, stack: Stack
) -> None:
    _sign_in(shell, stack, MEMBER)
    before = shell.session()
    # The session's access token has run out since the operator signed in.
    expired = {**before, "expires_at": int(time.time()) - 60}
    shell.session_file.write_text(json.dumps(expired))
    os.chmod(shell.session_file, 0o600)
    result = shell.run(
        "run", "client-report", "--client", str(ACME.id), *_period(), "--watch"
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout, result.stderr)
    after = shell.session()
    assert after["refresh_token"] != before["refresh_token"]
    assert after["access_token"] != before["access_token"]
    assert after["expires_at"] > time.time()
    run_id = result.stdout.split()[2].rstrip(":")
    async with get_client() as client:
        run = await client.read_flow_run(run_id)  # type: ignore[arg-type]
    assert run.state is not None and run.state.is_completed()
