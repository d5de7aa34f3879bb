"""Fixtures of the auth tests: users in the stack's `auth.users`, their tokens, settings."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def served_stand_in(stack: Stack, **settings: Any) -> Iterator[StackConfig]:
    """Another instance of the Auth stand-in, served over HTTP from this process.

    Same keys, secrets and database as the stack's, but its own port, request counters and
    `settings` (StackConfig fields, e.g. `auth_refresh_token_reuse_interval_s`), as the
    stack's own process would have with its TENANTFLOW_AUTH_* environment.
    """
    config = dataclasses.replace(
        stack.config, auth_port=free_ports(1, stack.config.host)[0], **settings
    )
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
    try:
        yield config
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def private_stand_in(stack: Stack) -> Iterator[StackConfig]:
    """A private stand-in with the stack's settings: tests that count JWKS or /user requests
    are not disturbed by anyone else using the shared stack. Tokens for it must be minted
    with the returned config (its `iss`)."""
    with served_stand_in(stack) as config:
        yield config


@pytest.fixture(scope="session")
def impatient_stand_in(stack: Stack) -> Iterator[StackConfig]:
    """A private stand-in whose used refresh tokens are never accepted again and whose
    one-time codes expire at once (reuse interval and OTP expiry 0, both GoTrue settings),
    so the refusals after those intervals are tested without waiting them out."""
    with served_stand_in(
        stack, auth_refresh_token_reuse_interval_s=0.0, auth_otp_expiry_s=0.0
    ) as config:
        yield config


@pytest.fixture
def counted_settings(settings: Settings, private_stand_in: StackConfig) -> Settings:
    """Settings that talk to the private stand-in."""
    return with_(settings, supabase_url=private_stand_in.supabase_url)


@pytest.fixture
async def counted_token(private_stand_in: StackConfig, user: StackUser) -> str:
    """A valid ES256 token of `user`, issued by the private stand-in."""
    return await mint_access_token(private_stand_in, user.email)
