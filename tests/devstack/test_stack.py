"""The local stack's lifecycle, on a second stack with its own folder and ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dotenv import dotenv_values

from tenantflow_dev import Stack, StackConfig
from tenantflow_dev.postgres import DURABILITY_SETTINGS
from tenantflow_dev.processes import pid_alive, port_is_open
from tests.processes import free_ports, processes_using

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture(params=["single"])
def second_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own on free ports; its Prefect topology is the fixture's param."""
    auth, pg, transaction, session, prefect, redis, *replicas = free_ports(8)
    config = StackConfig(
        project_dir=tmp_path,
        stack_dir=tmp_path / ".stack",
        pg_port=pg,
        transaction_pooler_port=transaction,
        session_pooler_port=session,
        auth_port=auth,
        prefect_port=prefect,
        # NOTE: deleted with tmp_path; faster without fsync, never the developer's stack.
        throwaway=True,
        prefect_topology=request.param,
        ha_redis_port=redis,
        ha_replica_ports=tuple(replicas),
    )
    stack = Stack(config)
    yield stack
    stack.down()


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    config = stack.config
    env = {**os.environ, **config.location_environment()}
    return subprocess.run(
        [sys.executable, "-m", "tenantflow_dev.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.parametrize("second_stack", ["single", "ha"], indirect=True)
def test_up_twice_status_down(second_stack: Stack) -> None:
    config = second_stack.config
    ports = second_stack.ports()
    assert not any(port_is_open(config.host, port) for port in ports)

    first = second_stack.up(setup=False)
    assert [part.name for part in first if not part.healthy] == []
    pids = {part.name: part.pid for part in first}
    assert all(pids.values())
    assert all(port_is_open(config.host, port) for port in ports)
    env_file = dotenv_values(config.project_dir / ".env")
    assert env_file["DATABASE_URL"] == config.database_url
    assert f":{config.session_pooler_port}/" in str(env_file["MIGRATION_DATABASE_URL"])
    # The seal key is JSON: it must come back whole.
    assert env_file["SEAL_PRIVATE_KEYS"] == config.secrets.seal_private_key
    env_stat = (config.project_dir / ".env").stat()
    # It holds the schema owner's login: its owner's only, never the workers' OS users'.
    assert oct(env_stat.st_mode & 0o777) == "0o600"
    assert env_stat.st_uid == os.geteuid()

    again = _cli(second_stack, "up", "--services-only")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already up") == len(first)
    assert f"http://127.0.0.1:{config.prefect_port}" in again.stdout
    assert "started: nothing" in again.stdout
    assert {part.name: part.pid for part in second_stack.status()} == pids

    status = _cli(second_stack, "status")
    assert status.returncode == 0, status.stdout
    for part in first:
        assert part.name in status.stdout and part.address in status.stdout
    assert "DOWN" not in status.stdout
    prefect = {
        line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("prefect")
    }
    if config.prefect_topology == "single":
        assert set(prefect) == {"prefect-server", "prefect-worker"}
        assert "ok (PostgreSQL)" in prefect["prefect-server"]
    else:
        assert set(prefect) == {
            "prefect-api-1",
            "prefect-api-2",
            "prefect-services",
            "prefect-lb",
            "prefect-worker",
        }
        for replica in ("prefect-api-1", "prefect-api-2"):
            assert "ok (PostgreSQL, API only)" in prefect[replica]
        assert "ok (PostgreSQL, background services)" in prefect["prefect-services"]
        assert "ok (2 of 2 replicas up)" in prefect["prefect-lb"]
        assert "ok (password, append-only file)" in next(
            line for line in status.stdout.splitlines() if line.startswith("redis ")
        )
    assert config.secrets.postgres_password not in again.stdout + status.stdout

    down = _cli(second_stack, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(port_is_open(config.host, port) for port in ports)
    assert processes_using(config.stack_dir) == []
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []

    # The throwaway cluster, and it alone, trades durability for speed.
    conf = (config.stack_dir / "postgres" / "data" / "postgresql.conf").read_text()
    assert "throwaway" in conf
    for name in DURABILITY_SETTINGS:
        assert f"{name} = off" in conf

    after = _cli(second_stack, "status")
    assert after.returncode == 3
    assert after.stdout.count("DOWN") == len(first)


def test_a_taken_port_is_reported_clearly(second_stack: Stack) -> None:
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind((second_stack.config.host, second_stack.config.pg_port))
        blocker.listen()
        result = _cli(second_stack, "up", "--services-only")
    assert result.returncode == 2
    assert f"port {second_stack.config.pg_port}" in result.stderr
    assert "TENANTFLOW_PG_PORT" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
