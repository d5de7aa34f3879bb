"""The operator's commands as an operator runs them: `.venv/bin/tenantflow ...` in a process
of its own, with a home and config folder of its own (in tmp_path), against the stack's
Supabase Auth stand-in through supabase-py's real client. Each test signs in users of its
own, deleted afterwards (the stack is shared)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tenantflow.sealing import public_key
from tenantflow_dev import Stack
from tenantflow_dev.auth_stand_in import create_user, delete_user

TENANTFLOW = Path(sys.executable).parent / "tenantflow"


@dataclass
class Operator:
    """One OS user's shell: its environment, folder and session file."""

    env: dict[str, str]
    cwd: Path

    @property
    def session_file(self) -> Path:
        return Path(self.env["XDG_CONFIG_HOME"]) / "tenantflow" / "session.json"

    def session(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.session_file.read_text())
        return document

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(TENANTFLOW), *args],
            input=stdin,
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, (result.stdout, result.stderr)
        return result

    def refused(self, *args: str, stdin: str = "") -> str:
        """The one line a refusal prints (exit 2)."""
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 2, (result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        return lines[0].removeprefix("error: ")

    def login(self, email: str, password: str) -> subprocess.CompletedProcess[str]:
        return self.ok("login", "--email", email, "--password-stdin", stdin=password + "\n")


@pytest.fixture
def operator(stack: Stack, tmp_path: Path) -> Operator:
    """A shell with only what an operator's laptop holds: Supabase's URL and anon key and the
    workers' public key (no database URL, no private key), in a folder without `.env`."""
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    config = stack.config
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **{key: os.environ[key] for key in keep if key in os.environ},
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "SUPABASE_URL": config.supabase_url,
        "SUPABASE_ANON_KEY": config.secrets.anon_key,
        "SEAL_PUBLIC_KEY": public_key(config.secrets.seal_private_key),
    }
    work = tmp_path / "work"
    work.mkdir()
    return Operator(env=env, cwd=work)


@dataclass(frozen=True)
class User:
    email: str
    password: str
    id: uuid.UUID


@pytest.fixture
async def make_user(stack: Stack) -> AsyncIterator[Callable[..., Awaitable[User]]]:
    """Create users of this test only (a password to sign in with), deleted afterwards."""
    made: list[str] = []

    async def make(name: str, *, operator: bool = False) -> User:
        email = f"{name}-{uuid.uuid4().hex[:10]}@operators.test"
        password = secrets.token_urlsafe(18)
        made.append(email)
        user_id = await create_user(stack.config, email, operator=operator, password=password)
        return User(email, password, user_id)

    yield make
    for email in made:
        await delete_user(stack.config, email)
