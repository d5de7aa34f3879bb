"""`tenantflow login / whoami / logout` against the stack's Supabase Auth: the session file
is 0600 in a 0700 folder; an access token about to expire is refreshed and the refresh token
rotates; a reused refresh token signs the operator out; logout revokes the session; a file
others can read is refused; no password in any output."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tenantflow_dev import Stack
from tests.operators.conftest import Operator, User

SIGNED_OUT = "signed out: run `tenantflow login`"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _expire_soon(operator: Operator, seconds: int = 5) -> dict[str, object]:
    """Make the saved access token look about to expire (the refresh margin is 60 s)."""
    document = operator.session()
    document["expires_at"] = int(time.time()) + seconds
    operator.session_file.write_text(json.dumps(document))
    return document


async def test_login_with_a_password_on_stdin_then_whoami(
    operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("login")
    result = operator.login(user.email, user.password)
    assert f"signed in as {user.email} (user {user.id})" in result.stdout
    assert user.password not in result.stdout + result.stderr
    path = operator.session_file
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    document = operator.session()
    assert document["user_id"] == str(user.id)
    assert document["email"] == user.email
    assert document["expires_at"] > time.time() + 60
    # The file holds the session; no password anywhere in it.
    assert user.password not in path.read_text()

    who = operator.ok("whoami").stdout
    assert who.startswith(f"{user.email} (user id {user.id})\n")
    assert "operator: no (app_metadata.roles, as read from Supabase Auth)" in who
    assert f"session file: {path}" in who
    assert document["access_token"] not in who


async def test_whoami_tells_an_operator(
    operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("op", operator=True)
    operator.login(user.email, user.password)
    assert "operator: yes (app_metadata.roles, as read from Supabase Auth)" in (
        operator.ok("whoami").stdout
    )


async def test_a_wrong_password_is_one_line_and_leaves_no_session(
    operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("wrong")
    wrong = user.password + "x"
    result = operator.run("login", "--email", user.email, "--password-stdin", stdin=wrong + "\n")
    assert result.returncode == 2
    assert result.stderr == "error: wrong email or password\n"
    assert wrong not in result.stdout + result.stderr
    assert not operator.session_file.exists()
    # An unknown address gets the same answer.
    assert (
        operator.refused(
            "login", "--email", "nobody-" + user.email, "--password-stdin", stdin=wrong + "\n"
        )
        == "wrong email or password"
    )


async def test_an_access_token_about_to_expire_is_refreshed_and_the_refresh_token_rotates(
    operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("refresh")
    operator.login(user.email, user.password)
    before = _expire_soon(operator)
    operator.ok("whoami")
    after = operator.session()
    assert after["refresh_token"] != before["refresh_token"]
    assert after["access_token"] != before["access_token"]
    assert after["expires_at"] > time.time() + 60
    assert after["user_id"] == str(user.id)
    # Rewritten as it was made: 0600, atomically (nothing else left in the folder).
    assert _mode(operator.session_file) == 0o600
    assert {p.name for p in operator.session_file.parent.iterdir()} <= {
        "session.json",
        ".session.json.lock",
    }
    # A token far from its expiry is used as it is: no refresh.
    operator.ok("whoami")
    assert operator.session()["refresh_token"] == after["refresh_token"]


async def test_a_reused_refresh_token_signs_the_operator_out(
    stack: Stack, operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("reuse")
    operator.login(user.email, user.password)
    stolen = _expire_soon(operator)
    operator.ok("whoami")  # rotates: `stolen`'s refresh token is now used
    assert operator.session()["refresh_token"] != stolen["refresh_token"]
    # NOTE: Auth accepts a used refresh token again within its reuse interval (a client
    # that lost the answer may retry); after it, a reuse is refused.
    await asyncio.sleep(stack.config.auth_refresh_token_reuse_interval_s + 1)
    operator.session_file.write_text(json.dumps(stolen))
    result = operator.run("whoami")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr == f"error: {SIGNED_OUT}\n"
    assert not operator.session_file.exists()
    assert operator.refused("whoami") == "not signed in: run `tenantflow login`"


async def test_logout_revokes_the_session_at_auth(
    operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("logout")
    operator.login(user.email, user.password)
    signed_in = operator.session()
    result = operator.ok("logout")
    assert result.stdout == (
        f"signed out: deleted {operator.session_file}; its session is revoked at Supabase Auth\n"
    )
    assert not operator.session_file.exists()
    # The old refresh token no longer works: put the file back and force a refresh.
    operator.session_file.write_text(json.dumps({**signed_in, "expires_at": 0}))
    operator.session_file.chmod(0o600)
    assert operator.refused("whoami") == SIGNED_OUT
    assert not operator.session_file.exists()
    # Nor does its access token, at Auth (`get_user`): the session is gone.
    operator.session_file.write_text(json.dumps(signed_in))
    operator.session_file.chmod(0o600)
    assert operator.refused("whoami") == SIGNED_OUT
    # Signed out already: logout says so and succeeds.
    assert operator.ok("logout").stdout == f"not signed in (no {operator.session_file})\n"


async def test_a_session_file_readable_by_others_is_refused(
    operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("mode")
    operator.login(user.email, user.password)
    path = operator.session_file
    path.chmod(0o644)
    assert operator.refused("whoami") == (
        f"session file {path} is readable by others (mode 0644); chmod 600 {path}"
    )
    assert operator.refused("token", "--flow", "client-report", "--client", str(user.id)) == (
        f"session file {path} is readable by others (mode 0644); chmod 600 {path}"
    )
    path.chmod(0o600)
    path.parent.chmod(0o755)
    assert "chmod 700" in operator.refused("whoami")
    path.parent.chmod(0o700)
    assert user.email in operator.ok("whoami").stdout
