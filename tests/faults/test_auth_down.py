"""Supabase Auth unreachable: cached keys keep verifying; a check that needs Auth is
retried for a few seconds, then refused as a transient failure that says so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tenantflow.auth import AuthServiceUnavailable, clear_jwks_cache, verify_access_token
from tenantflow.db import dispose_engines
from tenantflow.settings import Settings, get_settings
from tenantflow.tenancy import AUTH_ATTEMPTS, AccessDenied, ActorKind, authorize_token
from tenantflow_dev import Stack
from tenantflow_dev.auth_stand_in import AuthServer
from tenantflow_dev.processes import port_is_open
from tests.world import World

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture(autouse=True)
async def _dispose() -> AsyncIterator[None]:
    yield
    await dispose_engines()


@pytest.fixture
async def auth_down(stack: Stack, world: World) -> AsyncIterator[AuthServer]:
    """The Auth stand-in stopped, once this process holds the signing keys (as a worker
    that verified a token earlier does); started again afterwards."""
    await verify_access_token(await world.token("member_a"))
    auth = AuthServer(stack.config)
    await asyncio.to_thread(auth.stop)
    try:
        yield auth
    finally:
        await asyncio.to_thread(auth.start)


def _settings(folder: Path | None) -> Settings:
    return get_settings().model_copy(update={"auth_jwks_cache_dir": folder})


async def test_keys_kept_on_disk_verify_while_auth_is_down(
    world: World, stack: Stack, tmp_path: Path
) -> None:
    settings = _settings(tmp_path)
    token = await world.token("member_a")
    clear_jwks_cache(settings)
    assert (await verify_access_token(token, settings=settings)).sub == world.users["member_a"]
    kept = await asyncio.to_thread(lambda: list(tmp_path.glob("jwks-*.json")))
    assert kept, "the keys were not kept on disk"

    auth = AuthServer(stack.config)
    await asyncio.to_thread(auth.stop)
    try:
        # A new flow-run process: nothing in memory, the keys from the folder.
        clear_jwks_cache(_settings(None))
        verified = await verify_access_token(token, settings=settings)
        assert verified.sub == world.users["member_a"]
        # Without them, the failure is a clear, transient one.
        clear_jwks_cache(settings)
        with pytest.raises(AuthServiceUnavailable, match="could not fetch the signing keys"):
            await verify_access_token(token, settings=settings)
    finally:
        await asyncio.to_thread(auth.start)


async def test_a_check_that_needs_auth_is_retried_then_refused_clearly(
    world: World, auth_down: AuthServer
) -> None:
    token = await world.token("operator")
    started = asyncio.get_running_loop().time()
    with pytest.raises(AccessDenied, match="operator token refused") as caught:
        await authorize_token(action="t", mode="service", access_token=token, client_ids=None)
    waited = asyncio.get_running_loop().time() - started
    assert f"{AUTH_ATTEMPTS} attempts" in str(caught.value)
    assert "start the run again later" in str(caught.value)
    assert waited >= 2 ** (AUTH_ATTEMPTS - 1) - 1


async def test_auth_back_within_the_retries_lets_the_run_through(
    world: World, auth_down: AuthServer
) -> None:
    token = await world.token("operator")
    config = auth_down.config
    assert not port_is_open(config.host, config.auth_port), "Auth is down when the check starts"
    # NOTE: started at once, not after a pause: the first attempt still finds nothing
    # listening (a new process needs a second or more before it binds), and on a busy
    # machine the whole retry window is left for the start.
    back = asyncio.ensure_future(asyncio.to_thread(auth_down.start))
    contexts = await authorize_token(
        action="t", mode="service", access_token=token, client_ids=[world.clients["a"]]
    )
    await back
    assert contexts[0].actor.kind is ActorKind.OPERATOR
