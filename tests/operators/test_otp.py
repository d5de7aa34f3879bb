"""`tenantflow login --otp`: Auth emails a one-time code (the stand-in's mailbox), the
operator types it, and the session is kept as with a password; a wrong code, or an address
without a user, is one line (no user is ever created)."""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable

import asyncpg

from tenantflow_dev import Stack
from tenantflow_dev.auth_stand_in import latest_one_time_code
from tests.operators.conftest import TENANTFLOW, Operator, User


def _login_with_code(
    operator: Operator, email: str, code_for: Callable[[], str]
) -> subprocess.CompletedProcess[str]:
    """Run `login --otp --code-stdin`, typing the code once the command says it was sent."""
    process = subprocess.Popen(
        [str(TENANTFLOW), "login", "--email", email, "--otp", "--code-stdin"],
        env=operator.env,
        cwd=operator.cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None and process.stdin is not None
    sent = process.stderr.readline()
    if sent == f"a one-time code was sent to {email}\n":
        process.stdin.write(code_for() + "\n")
        process.stdin.flush()
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, sent + stderr)


async def test_login_with_an_emailed_code(
    stack: Stack, operator: Operator, make_user: Callable[..., Awaitable[User]]
) -> None:
    user = await make_user("otp", operator=True)
    codes: list[str] = []

    def code() -> str:
        found = latest_one_time_code(stack.config, user.email)
        assert found is not None
        codes.append(found)
        return found

    result = _login_with_code(operator, user.email, code)
    assert result.returncode == 0, result.stderr
    assert f"signed in as {user.email} (user {user.id})" in result.stdout
    assert codes[0] not in result.stdout + result.stderr
    assert operator.session()["user_id"] == str(user.id)
    assert "operator: yes" in operator.ok("whoami").stdout
    # A code is good once.
    again = _login_with_code(operator, user.email, lambda: codes[0])
    assert again.returncode == 2
    assert again.stderr.splitlines()[-1] == (
        "error: the code is wrong or has expired: run `tenantflow login --otp` for a new one"
    )
    assert codes[0] not in again.stdout + again.stderr


async def test_a_wrong_code_or_an_unknown_address_is_one_line(
    stack: Stack,
    operator: Operator,
    admin_conn: asyncpg.Connection,
    make_user: Callable[..., Awaitable[User]],
) -> None:
    user = await make_user("otp-wrong")
    wrong = _login_with_code(operator, user.email, lambda: "000000")
    assert wrong.returncode == 2
    assert wrong.stderr.splitlines() == [
        f"a one-time code was sent to {user.email}",
        "error: the code is wrong or has expired: run `tenantflow login --otp` for a new one",
    ]
    assert not operator.session_file.exists()

    stranger = "stranger-" + user.email
    unknown = _login_with_code(operator, stranger, lambda: "000000")
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines() == [
        "error: Supabase Auth sends no one-time code for this address (no such user, or "
        "email codes are off for the project): sign in with the password instead"
    ]
    # `should_create_user` is off: no user was made for the stranger.
    assert (
        await admin_conn.fetchval("SELECT count(*) FROM auth.users WHERE email = $1", stranger) == 0
    )
