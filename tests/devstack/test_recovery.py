"""Recovering one part of the stack takes seconds, and its cluster is durable."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import asyncpg
import pytest

from tenantflow_dev import Stack
from tenantflow_dev.pgbouncer import PgBouncer
from tenantflow_dev.postgres import DURABILITY_SETTINGS

pytestmark = [pytest.mark.stack]

#: How the lines start that only the one-shot steps print (migrate, demo data, deploy,
#: the demo run).
ONE_SHOT_LINES = ("applying ", "upgraded ", "database ", "demo data ", "deployed ", "main job")


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.config.location_environment()}
    return subprocess.run(
        [sys.executable, "-m", "tenantflow_dev.cli", *args],
        env=env,
        cwd=stack.config.project_dir,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


async def _settings(stack: Stack) -> dict[str, str]:
    config = stack.config
    conn = await asyncpg.connect(**config.connect_parts(config.pg_port, admin=True))
    try:
        return {name: await conn.fetchval(f"SHOW {name}") for name in DURABILITY_SETTINGS}
    finally:
        await conn.close()


@pytest.fixture
def set_up_stack(stack: Stack) -> Stack:
    if not stack.is_set_up():
        # NOTE: a stack folder from before the set-up marker: run the one-shot steps once.
        stack.up(setup=True)
    return stack


def test_the_stacks_cluster_is_durable(set_up_stack: Stack) -> None:
    assert not set_up_stack.config.throwaway
    assert asyncio.run(_settings(set_up_stack)) == dict.fromkeys(DURABILITY_SETTINGS, "on")


def test_up_brings_back_one_part_in_seconds(set_up_stack: Stack) -> None:
    stack = set_up_stack
    pooler = PgBouncer(stack.config, "transaction")
    assert pooler.stop()
    assert not pooler.health().running

    started = time.monotonic()
    result = _cli(stack, "up")
    seconds = time.monotonic() - started
    sys.stderr.write(f"\ntenantflow-dev up with the transaction pooler down: {seconds:.1f}s\n")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "started   pgbouncer-transaction" in result.stdout
    assert "started: pgbouncer-transaction;" in result.stdout
    assert "one-shot steps (migrate, demo data, deploy): skipped" in result.stdout
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.strip().startswith(ONE_SHOT_LINES)] == []
    assert result.stdout.count("(already up)") == len(stack.services()) - 1
    assert pooler.health().healthy
    # NOTE: "in seconds" is what the lines above show (one part started, nothing re-run);
    # the time itself is printed, not asserted: a busy machine must not fail this test.
    assert all(part.healthy for part in stack.status())


def test_up_turns_durability_back_on(set_up_stack: Stack) -> None:
    """A cluster running with a setting off (as older stacks made it) is fixed by `up`."""
    stack = set_up_stack

    async def turn_off() -> None:
        config = stack.config
        conn = await asyncpg.connect(**config.connect_parts(config.pg_port, admin=True))
        try:
            await conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    asyncio.run(turn_off())
    try:
        result = _cli(stack, "up")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "durable   postgres: synchronous_commit were off, now on" in result.stdout
        assert asyncio.run(_settings(stack)) == dict.fromkeys(DURABILITY_SETTINGS, "on")
    finally:
        stack.up(setup=False)


def test_restart_one_part(set_up_stack: Stack) -> None:
    stack = set_up_stack
    before = stack.service("pgbouncer-transaction").health()
    assert before.healthy and before.pid

    started = time.monotonic()
    result = _cli(stack, "restart", "pgbouncer-transaction")
    seconds = time.monotonic() - started
    sys.stderr.write(f"\ntenantflow-dev restart pgbouncer-transaction: {seconds:.1f}s\n")

    assert result.returncode == 0, result.stdout + result.stderr
    after = stack.service("pgbouncer-transaction").health()
    assert after.healthy and after.pid and after.pid != before.pid
    assert "restarted pgbouncer-transaction" in result.stdout

    unknown = _cli(stack, "restart", "pgbouncer")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: no part called 'pgbouncer': choose one of postgres,")
    assert len(unknown.stderr.splitlines()) == 1
