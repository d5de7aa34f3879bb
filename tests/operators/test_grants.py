"""`tenantflow operator grant / revoke / list` through Auth's admin API with the service-role
key: only `tenantflow_operator` changes in `app_metadata.roles`, every other role and key is
kept; the key is never shown; a wrong key or an unknown user is one line."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from tenantflow_dev import Stack
from tests.operators.conftest import Operator, User


async def _app_metadata(conn: asyncpg.Connection, user: User) -> dict[str, Any]:
    raw = await conn.fetchval(
        "SELECT raw_app_meta_data::text FROM auth.users WHERE id = $1", user.id
    )
    metadata: dict[str, Any] = json.loads(raw)
    return metadata


async def test_grant_list_revoke_round_trip_keeps_other_roles_and_keys(
    stack: Stack,
    operator: Operator,
    admin_conn: asyncpg.Connection,
    make_user: Callable[..., Awaitable[User]],
) -> None:
    key = stack.config.secrets.service_role_key + "\n"
    user = await make_user("grantee")
    bystander = await make_user("bystander")
    await admin_conn.execute(
        "UPDATE auth.users SET raw_app_meta_data = raw_app_meta_data "
        '|| \'{"roles": ["support"], "team": "billing"}\'::jsonb WHERE id = $1',
        user.id,
    )
    before = await _app_metadata(admin_conn, user)

    granted = operator.ok("operator", "grant", user.email, "--service-role-key-stdin", stdin=key)
    assert granted.stdout == f"{user.email} is now an operator\n"
    assert await _app_metadata(admin_conn, user) == {
        **before,
        "roles": ["support", "tenantflow_operator"],
    }
    again = operator.ok("operator", "grant", user.email, "--service-role-key-stdin", stdin=key)
    assert again.stdout == f"{user.email} is now an operator (no change)\n"

    listed = operator.ok("operator", "list", "--service-role-key-stdin", stdin=key).stdout
    assert user.email in listed.splitlines()
    assert bystander.email not in listed.splitlines()

    revoked = operator.ok("operator", "revoke", user.email, "--service-role-key-stdin", stdin=key)
    assert revoked.stdout == f"{user.email} is no longer an operator\n"
    assert await _app_metadata(admin_conn, user) == {**before, "roles": ["support"]}
    listed = operator.ok("operator", "list", "--service-role-key-stdin", stdin=key).stdout
    assert user.email not in listed.splitlines()

    for result in (granted, again, revoked):
        assert key.strip() not in result.stdout + result.stderr


async def test_a_wrong_key_or_an_unknown_user_is_one_line(
    stack: Stack, operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("nobody")
    anon = stack.config.secrets.anon_key
    refusal = operator.refused(
        "operator", "grant", user.email, "--service-role-key-stdin", stdin=anon + "\n"
    )
    assert refusal.startswith("Supabase Auth refused the service-role key")
    assert anon not in refusal
    key = stack.config.secrets.service_role_key + "\n"
    assert (
        operator.refused(
            "operator", "grant", "no-" + user.email, "--service-role-key-stdin", stdin=key
        )
        == f"no user with email {'no-' + user.email!r} in Supabase Auth"
    )
    assert operator.refused("operator", "grant", "--service-role-key-stdin", stdin=key) == (
        "operator grant needs the user's EMAIL"
    )
