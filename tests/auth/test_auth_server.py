"""The Auth stand-in speaks Supabase Auth's contract; its tokens carry Supabase's claims."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import date
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

from tenantflow.auth import OPERATOR_ROLE, app_metadata_grants_operator, verify_access_token
from tenantflow.sealing import OpenedSeal, SealWrongFlow, SealWrongParameters, open_sealed_token
from tenantflow.settings import Settings
from tenantflow_dev import Stack
from tenantflow_dev.auth_stand_in import UnknownUser, create_user, mint_access_token, set_operator
from tests.auth.support import StackUser, claims_of

pytestmark = pytest.mark.stack

SUPABASE_CLAIMS = {
    "aud",
    "exp",
    "iat",
    "iss",
    "sub",
    "email",
    "phone",
    "app_metadata",
    "user_metadata",
    "role",
    "aal",
    "amr",
    "session_id",
    "is_anonymous",
}


def user_endpoint(stack: Stack) -> str:
    return f"{stack.config.supabase_url}/auth/v1/user"


def test_the_jwks_publishes_public_keys_only(stack: Stack) -> None:
    response = httpx.get(f"{stack.config.supabase_url}/auth/v1/.well-known/jwks.json", timeout=5)
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert keys
    for key in keys:
        assert key["kty"] in {"EC", "RSA"}
        assert {"d", "p", "q", "dp", "dq", "qi", "k"}.isdisjoint(key)
        assert key["kid"] and key["alg"] in {"ES256", "RS256"} and key["use"] == "sig"


def test_the_stack_api_keys_are_supabase_shaped(stack: Stack) -> None:
    secrets = stack.config.secrets
    for key, role in ((secrets.anon_key, "anon"), (secrets.service_role_key, "service_role")):
        claims = jwt.decode(key, secrets.jwt_secret, algorithms=["HS256"])
        assert claims["role"] == role
        assert claims["iss"] == "supabase-demo"
        assert "sub" not in claims


async def test_minted_tokens_carry_exactly_supabase_claims(
    stack: Stack, user: StackUser, token: str
) -> None:
    header = jwt.get_unverified_header(token)
    claims = claims_of(token)

    assert header["alg"] == "ES256" and header["typ"] == "JWT" and header["kid"]
    assert set(claims) == SUPABASE_CLAIMS
    assert claims["iss"] == f"{stack.config.supabase_url}/auth/v1"
    assert claims["aud"] == "authenticated" and claims["role"] == "authenticated"
    assert claims["sub"] == str(user.id) and claims["email"] == user.email
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["app_metadata"] == {"provider": "email", "providers": ["email"]}
    assert claims["amr"][0]["method"] == "password"
    assert claims["is_anonymous"] is False and claims["phone"] == ""


async def test_operators_carry_the_grant_in_app_metadata(stack: Stack, user: StackUser) -> None:
    plain = claims_of(await mint_access_token(stack.config, user.email))
    assert not app_metadata_grants_operator(plain["app_metadata"])

    # A stale token may carry the grant after auth.users dropped it: `operator=True` mints one.
    forced = claims_of(await mint_access_token(stack.config, user.email, operator=True))
    assert forced["app_metadata"]["roles"] == [OPERATOR_ROLE]

    await set_operator(stack.config, user.email, True)
    granted = claims_of(await mint_access_token(stack.config, user.email))
    assert app_metadata_grants_operator(granted["app_metadata"])
    await set_operator(stack.config, user.email, False)
    revoked = claims_of(await mint_access_token(stack.config, user.email))
    assert not app_metadata_grants_operator(revoked["app_metadata"])
    assert revoked["app_metadata"]["provider"] == "email"


async def test_create_user_is_idempotent_on_email(
    stack: Stack, user: StackUser, admin_conn: asyncpg.Connection
) -> None:
    again = await create_user(stack.config, user.email.upper(), operator=True)
    assert again == user.id
    raw = await admin_conn.fetchval(
        "SELECT raw_app_meta_data::text FROM auth.users WHERE id = $1", user.id
    )
    assert OPERATOR_ROLE in raw


async def test_minting_for_an_unknown_email_fails(stack: Stack) -> None:
    with pytest.raises(UnknownUser):
        await mint_access_token(stack.config, f"nobody-{uuid.uuid4().hex}@example.test")


def test_user_endpoint_needs_an_api_key(stack: Stack, token: str) -> None:
    bearer = {"Authorization": f"Bearer {token}"}
    missing = httpx.get(user_endpoint(stack), headers=bearer, timeout=5)
    assert missing.status_code == 401
    assert missing.json() == {
        "message": "No API key found in request",
        "hint": "No `apikey` request header or url param was found.",
    }
    wrong = httpx.get(user_endpoint(stack), headers={**bearer, "apikey": "nope"}, timeout=5)
    assert wrong.status_code == 401
    assert wrong.json()["message"] == "Invalid API key"


def test_user_endpoint_answers_like_gotrue(stack: Stack, user: StackUser, token: str) -> None:
    secrets = stack.config.secrets
    ok = httpx.get(
        user_endpoint(stack),
        headers={"apikey": secrets.anon_key, "Authorization": f"Bearer {token}"},
        timeout=5,
    )
    assert ok.status_code == 200
    body = ok.json()
    assert body["id"] == str(user.id) and body["email"] == user.email
    assert body["aud"] == "authenticated" and body["role"] == "authenticated"
    assert body["app_metadata"]["provider"] == "email"
    assert {"created_at", "updated_at", "identities", "is_anonymous"} <= set(body)

    # The service-role key is an API key too, and may come as a query parameter.
    assert (
        httpx.get(
            user_endpoint(stack),
            params={"apikey": secrets.service_role_key},
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        ).status_code
        == 200
    )

    no_bearer = httpx.get(user_endpoint(stack), headers={"apikey": secrets.anon_key}, timeout=5)
    assert no_bearer.status_code == 401
    assert no_bearer.json() == {
        "code": 401,
        "error_code": "no_authorization",
        "msg": "This endpoint requires a Bearer token",
    }

    anon = httpx.get(
        user_endpoint(stack),
        headers={"apikey": secrets.anon_key, "Authorization": f"Bearer {secrets.anon_key}"},
        timeout=5,
    )
    assert anon.status_code == 403
    assert anon.json() == {
        "code": 403,
        "error_code": "bad_jwt",
        "msg": "invalid claim: missing sub claim",
    }

    bad = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    legacy = httpx.get(
        user_endpoint(stack),
        headers={"apikey": secrets.anon_key, "Authorization": f"Bearer {bad}"},
        timeout=5,
    )
    assert legacy.status_code == 403
    assert legacy.json()["error_code"] == "bad_jwt"
    assert legacy.json()["msg"].startswith("invalid JWT: unable to parse or verify signature")

    versioned = httpx.get(
        user_endpoint(stack),
        headers={
            "apikey": secrets.anon_key,
            "Authorization": f"Bearer {bad}",
            "X-Supabase-Api-Version": "2024-01-01",
        },
        timeout=5,
    )
    assert versioned.status_code == 403
    assert versioned.headers["x-supabase-api-version"] == "2024-01-01"
    assert versioned.json()["code"] == "bad_jwt"
    assert set(versioned.json()) == {"code", "message"}


def test_logout_signs_the_session_out(stack: Stack, token: str) -> None:
    headers = {"apikey": stack.config.secrets.anon_key, "Authorization": f"Bearer {token}"}
    assert httpx.get(user_endpoint(stack), headers=headers, timeout=5).status_code == 200
    logout = httpx.post(f"{stack.config.supabase_url}/auth/v1/logout", headers=headers, timeout=5)
    assert logout.status_code == 204
    after = httpx.get(user_endpoint(stack), headers=headers, timeout=5)
    assert after.status_code == 403
    assert after.json()["error_code"] == "session_not_found"


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    config = stack.config
    env = {**os.environ, **config.location_environment()}
    command = Path(sys.executable).parent / "tenantflow-dev"
    return subprocess.run(
        [str(command), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


async def test_cli_prints_only_a_verifiable_token(
    stack: Stack, settings: Settings, user: StackUser
) -> None:
    result = _cli(
        stack, "token", "--email", user.email, "--operator", "--plain", "--expires-in", "600"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    token = result.stdout.strip()
    verified = await verify_access_token(token, settings=settings)
    assert verified.sub == user.id
    assert verified.token_grants_operator
    assert (verified.expires_at - verified.issued_at).total_seconds() == 600

    missing = _cli(stack, "token", "--email", f"nobody-{uuid.uuid4().hex}@example.test", "--plain")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert "no user" in missing.stderr


async def test_cli_seals_for_one_flow_its_clients_and_its_parameters(
    stack: Stack, settings: Settings, user: StackUser
) -> None:
    client = uuid.uuid4()
    result = _cli(
        stack,
        "token",
        "--email",
        user.email,
        "--flow",
        "client-report",
        "--client",
        str(client),
        "--param",
        "period_start=2026-11-01",
        "--param",
        "period_end=2026-11-30",
    )
    assert result.returncode == 0, result.stderr
    sealed = result.stdout.strip()
    assert result.stdout.count("\n") == 1 and sealed.count(".") == 4
    # The run's parameters as the flow receives them (dates, not text).
    period = {"period_start": date(2026, 11, 1), "period_end": date(2026, 11, 30)}

    def open_for(flow: str, **parameters: object) -> OpenedSeal:
        return open_sealed_token(
            sealed,
            stack.config.secrets.seal_private_key,
            flow=flow,
            client_ids=[client],
            parameters={"client_id": client, **period, **parameters},
        )

    opened = open_for("client-report")
    assert (opened.expires_at - opened.issued_at).total_seconds() == 900
    verified = await verify_access_token(opened.token, settings=settings)
    assert verified.sub == user.id
    with pytest.raises(SealWrongFlow):
        open_for("migrate")
    with pytest.raises(SealWrongParameters):
        open_for("client-report", period_end=date(2026, 12, 31))
    unsealed = _cli(stack, "token", "--email", user.email)
    assert unsealed.returncode == 2 and unsealed.stdout == ""
    assert "--flow is needed" in unsealed.stderr
