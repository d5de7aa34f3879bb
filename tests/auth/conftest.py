"""Fixtures of the auth tests: users in the stack's `auth.users`, their tokens, settings."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn

from tenantflow.auth import clear_jwks_cache
from tenantflow.settings import Settings, load_settings
from tenantflow_dev import Stack, StackConfig
from tenantflow_dev.auth_stand_in import create_app, create_user, delete_user, mint_access_token
from tests.auth.support import StackUser, with_
from tests.processes import free_ports


@pytest.fixture(autouse=True)
def fresh_jwks_cache() -> Iterator[None]:
    clear_jwks_cache()
    yield
    clear_jwks_cache()


@pytest.fixture
def settings(stack: Stack) -> Settings:
    """The stack's settings, read from the environment the top conftest sets."""
    return load_settings()


async def _user(stack: Stack, **options: Any) -> AsyncIterator[StackUser]:
    email = f"auth-test-{uuid.uuid4().hex[:10]}@example.test"
    user_id = await create_user(stack.config, email, **options)
    yield StackUser(email, user_id)
    await delete_user(stack.config, email)


@pytest.fixture
async def user(stack: Stack) -> AsyncIterator[StackUser]:
    async for created in _user(stack):
        yield created


@pytest.fixture
async def anonymous_user(stack: Stack) -> AsyncIterator[StackUser]:
    async for created in _user(stack, is_anonymous=True):
        yield created


@pytest.fixture
async def token(stack: Stack, user: StackUser) -> str:
    """A valid ES256 access token of `user`, with a live session."""
    return await mint_access_token(stack.config, user.email)


@pytest.fixture(scope="session")
def private_stand_in(stack: Stack) -> Iterator[StackConfig]:
    """A second instance of the Auth stand-in, served over HTTP from this process.

    Same keys, secrets and database as the stack's, but its own port and request counters,
    so tests that count JWKS or /user requests are not disturbed by anyone else using the
    shared stack. Tokens for it must be minted with the returned config (its `iss`).
    """
    config = dataclasses.replace(stack.config, auth_port=free_ports(1, stack.config.host)[0])
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=config.host,
            port=config.auth_port,
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, name="auth-stand-in", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the private Auth stand-in did not start"
        time.sleep(0.02)
    yield config
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def counted_settings(settings: Settings, private_stand_in: StackConfig) -> Settings:
    """Settings that talk to the private stand-in."""
    return with_(settings, supabase_url=private_stand_in.supabase_url)


@pytest.fixture
async def counted_token(private_stand_in: StackConfig, user: StackUser) -> str:
    """A valid ES256 token of `user`, issued by the private stand-in."""
    return await mint_access_token(private_stand_in, user.email)
