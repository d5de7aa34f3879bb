"""`tenantflow token`: the signed-in user's access token sealed for one run, opened by the
worker's private key only for that flow, those clients and those parameters; operator
flows refused early for a user without the grant; no public key, one line."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest

from tenantflow.sealing import (
    SealWrongClients,
    SealWrongFlow,
    SealWrongParameters,
    looks_sealed,
    open_sealed_token,
)
from tenantflow_dev import Stack
from tenantflow_dev.auth_stand_in import create_user
from tests.operators.conftest import Operator, User

PERIOD = {"period_start": "2026-11-01", "period_end": "2026-11-30"}


def _sealed(operator: Operator, *args: str) -> tuple[str, str]:
    """The sealed value (stdout, one line and nothing else) and the stderr advice."""
    result = operator.ok("token", *args)
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and looks_sealed(lines[0]), "stdout holds the sealed value only"
    return lines[0], result.stderr


async def test_a_client_report_token_opens_on_the_worker_for_exactly_its_run(
    stack: Stack, operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("member")
    operator.login(user.email, user.password)
    client = uuid.uuid4()
    sealed, advice = _sealed(
        operator,
        "--flow", "client-report", "--client", str(client),
        "--param", "period_start=2026-11-01", "--param", "period_end=2026-11-30",
    )  # fmt: skip
    assert advice.startswith("sealed for one run of client-report, valid until ")
    assert advice.endswith(
        f"enter beside it exactly: client_id={client}, period_start=2026-11-01, "
        "period_end=2026-11-30\n"
    )
    access_token = operator.session()["access_token"]
    assert access_token not in advice
    private = stack.config.secrets.seal_private_key
    opened = open_sealed_token(
        sealed, private, flow="client-report", client_ids=[client], parameters=PERIOD
    )
    assert opened.token.get_secret_value() == access_token
    with pytest.raises(SealWrongParameters):
        open_sealed_token(
            sealed,
            private,
            flow="client-report",
            client_ids=[client],
            parameters={**PERIOD, "period_end": "2026-12-31"},
        )
    with pytest.raises(SealWrongClients):
        open_sealed_token(
            sealed, private, flow="client-report", client_ids=[uuid.uuid4()], parameters=PERIOD
        )
    with pytest.raises(SealWrongFlow):
        open_sealed_token(
            sealed, private, flow="nightly-rollup", client_ids=[client], parameters=PERIOD
        )


async def test_operator_flows_are_refused_early_to_a_user_without_the_grant(
    stack: Stack, operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("plain")
    operator.login(user.email, user.password)
    for flow in ("nightly-rollup", "migrate"):
        refusal = operator.refused("token", "--flow", flow)
        assert refusal == (
            f"{flow} runs only for tenantflow operators, and {user.email} is not one "
            "(app_metadata.roles lacks tenantflow_operator): the worker would refuse the run; "
            "an operator grants it with `tenantflow operator grant EMAIL`"
        )
    # Granted since the sign-in: the next token asks Auth for fresh claims, and is sealed.
    await create_user(stack.config, user.email, operator=True)
    sealed, advice = _sealed(operator, "--flow", "nightly-rollup", "--param", "day=2026-11-30")
    assert "client_ids left empty (every active client), day=2026-11-30" in advice
    opened = open_sealed_token(
        sealed,
        stack.config.secrets.seal_private_key,
        flow="nightly-rollup",
        client_ids=None,
        parameters={"day": "2026-11-30"},
    )
    assert opened.token.get_secret_value() == operator.session()["access_token"]


async def test_an_operator_seals_a_rollup_of_some_clients(
    stack: Stack, operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("op", operator=True)
    operator.login(user.email, user.password)
    clients = [uuid.uuid4(), uuid.uuid4()]
    sealed, advice = _sealed(
        operator, "--flow", "nightly-rollup", *(f"--client={c}" for c in clients), "--ttl", "120"
    )
    assert f'client_ids=["{clients[0]}", "{clients[1]}"]' in advice
    opened = open_sealed_token(
        sealed,
        stack.config.secrets.seal_private_key,
        flow="nightly-rollup",
        client_ids=clients,
        parameters={},
    )
    assert (opened.expires_at - opened.issued_at).total_seconds() == 120


async def test_without_a_public_key_or_with_a_bad_request_the_token_command_says_what_to_do(
    operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("nokey")
    operator.login(user.email, user.password)
    no_key = Operator(
        {k: v for k, v in operator.env.items() if k != "SEAL_PUBLIC_KEY"}, operator.cwd
    )
    assert no_key.refused("token", "--flow", "client-report", "--client", str(user.id)) == (
        "no public key to seal with: set SEAL_PUBLIC_KEY (the workers' public JWK, JSON) or "
        "SEAL_PUBLIC_KEY_FILE (a file holding it); the platform team prints it with "
        "`tenantflow seal-key public`"
    )
    assert operator.refused("token", "--flow", "client-report") == (
        "client-report runs for one client: give exactly one --client ID"
    )
