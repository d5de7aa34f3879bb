"""The worker image as users run it: built from the Dockerfile (`make image`'s code), run
with podman on `--network host` against the stack, its settings in an env file.

What it holds (uid 10001, no dev stack, the checkout's single migration head), its worker
as PID 1 taking a run, its stop on SIGTERM (no new run taken; the run in flight finishes
within WORKER_DRAIN_S or is stopped and ends Crashed, its slots given back; each said in
the log), and a container with missing or wrong settings failing in one line naming them.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType

from tenantflow.deployments import MIGRATE_POOL
from tenantflow.migrate import script_directory
from tenantflow.sealing import generate_private_key, public_key
from tenantflow_dev import Stack
from tenantflow_dev.image import BuiltImage
from tenantflow_dev.podman import Podman
from tenantflow_dev.worker_container import tenant_worker_settings
from tests.deployments.test_alerts import TERMINAL, _wait_for
from tests.image.conftest import STARTED, Container
from tests.world import World

pytestmark = [pytest.mark.stack]

Start = Callable[..., Container]
#: The worker's name in Prefect's "Worker '<name>' started!" line.
_WORKER_NAME = re.compile(r"Worker '(?P<name>[^']+)' started!")


def _in_image(podman: Podman, image: BuiltImage, script: str) -> str:
    """What `python -c script` prints in a fresh container of the image."""
    return podman.run("run", "--rm", image.reference, "python", "-c", script).stdout


def test_the_image_runs_as_uid_10001_and_holds_no_dev_stack(
    podman: Podman, worker_image: BuiltImage
) -> None:
    user = podman.run("image", "inspect", "--format", "{{.Config.User}}", worker_image.reference)
    assert user.stdout.strip() == "10001:10001"
    found = json.loads(
        _in_image(
            podman,
            worker_image,
            "import importlib.util, json, os, pathlib, sys\n"
            "site = next(pathlib.Path(p) for p in sys.path if p.endswith('site-packages'))\n"
            "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(),\n"
            " 'modules': [m for m in ('tenantflow_dev', 'devstack', 'tests', 'bench', 'pytest')\n"
            "             if importlib.util.find_spec(m)],\n"
            " 'app': sorted(p.name for p in pathlib.Path('/app').iterdir()),\n"
            " 'site': sorted(p.name for p in site.iterdir() if 'tenantflow' in p.name),\n"
            " 'dev_files': [str(p) for root in ('/app', '/opt', '/home', '/usr/local')\n"
            "               for name in ('tenantflow_dev', 'devstack', 'test_dockerfile.py')\n"
            "               for p in pathlib.Path(root).rglob(name)],\n"
            " 'package': importlib.util.find_spec('tenantflow').submodule_search_locations[0]}))",
        )
    )
    assert (found["uid"], found["gid"]) == (10001, 10001)
    assert found["modules"] == [], "dev-stack or test code is importable in the image"
    assert found["app"] == ["flows", "prefect.yaml"]
    assert found["site"] == ["tenantflow", "tenantflow-0.1.0.dist-info"]
    assert found["dev_files"] == []
    assert found["package"].startswith("/opt/venv/"), found["package"]


def test_the_image_holds_the_migrations_with_the_checkouts_single_head(
    podman: Podman, worker_image: BuiltImage
) -> None:
    shipped = _in_image(
        podman,
        worker_image,
        "from tenantflow.migrate import script_directory\n"
        "print(' '.join(script_directory().get_heads()))",
    ).split()
    assert shipped == script_directory().get_heads()
    assert len(shipped) == 1


async def test_the_worker_is_pid_1_and_takes_a_noop_run_to_completed(
    podman: Podman, worker_container: Start, without_stack_worker: None
) -> None:
    container = await asyncio.to_thread(worker_container)
    logs = await asyncio.to_thread(container.wait_for_line, STARTED)
    match = _WORKER_NAME.search(logs)
    assert match, logs
    pid1 = podman.run("exec", container.name, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert pid1[1:4] == ["/opt/venv/bin/tenantflow", "worker", "--pool"], pid1
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("noop/noop")
        run = await client.create_flow_run_from_deployment(deployment.id)
        done = await _wait_for(client, run.id, TERMINAL, 120)
    assert done.state_type == StateType.COMPLETED, done.state
    assert done.labels.get("prefect.worker.name") == match["name"]


async def test_a_worker_container_with_another_seal_key_refuses_sealed_runs_naming_the_key(
    world: World, stack: Stack, worker_container: Start, without_stack_worker: None
) -> None:
    # NOTE: a well-formed key of another pair: the worker cannot tell at start which public
    # key the operators seal with; each sealed run it takes is refused before any client.
    other = generate_private_key()
    settings = {**tenant_worker_settings(stack.config), "SEAL_PRIVATE_KEYS": other}
    container = await asyncio.to_thread(worker_container, settings)
    await asyncio.to_thread(container.wait_for_line, STARTED)
    today = datetime.now(UTC).date().isoformat()
    period = {"period_start": today, "period_end": today}
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"], parameters=period)
    async with get_client() as client:
        report = await client.read_deployment_by_name("client-report/client-report")
        run = await client.create_flow_run_from_deployment(
            report.id,
            parameters={"client_id": str(world.clients["a"]), **period, "access_token": sealed},
        )
        done = await _wait_for(client, run.id, TERMINAL, 120)
    assert done.state_type == StateType.FAILED, done.state
    message = done.state.message or ""
    assert "sealed access token refused" in message, message
    assert "cannot be opened with this worker's keys" in message, message
    assert json.loads(other)["d"] not in container.logs()
    reports = await world.sql(
        "fetchval", "SELECT count(*) FROM public.client_reports WHERE flow_run_id = $1", run.id
    )
    assert reports == 0


@pytest.fixture
async def held_locks(world: World) -> AsyncIterator[Any]:
    """Two advisory locks the test holds (on a connection of its own) and releases by key:
    a rollup whose trigger waits for one is in flight for exactly as long as the test says."""
    conn = await world.admin()
    keys = random.sample(range(1, 2**31), 2)
    for key in keys:
        await conn.execute("SELECT pg_advisory_lock($1)", key)
    try:
        yield conn, keys
    finally:
        await conn.execute("SELECT pg_advisory_unlock_all()")
        await conn.close()


async def _waiting_on(world: World, key: int) -> bool:
    waiting = await world.sql(
        "fetchval",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND NOT granted",
        key,
    )
    return bool(waiting)


@pytest.mark.slow
@pytest.mark.usefixtures("db_limit", "without_stack_worker")
async def test_on_sigterm_the_worker_takes_no_new_run_and_says_what_happens_to_those_in_flight(
    world: World, stack: Stack, worker_container: Start, held_locks: Any, db_limit: str
) -> None:
    conn, (key_a, key_b) = held_locks
    drain_s = 15
    settings = {**tenant_worker_settings(stack.config), "WORKER_DRAIN_S": str(drain_s)}
    container = await asyncio.to_thread(worker_container, settings)
    await asyncio.to_thread(container.wait_for_line, STARTED)
    today = datetime.now(UTC).date()
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(db_limit)
        slots_before = limit.active_slots
        rollup = await client.read_deployment_by_name("nightly-rollup/nightly-rollup")
        report = await client.read_deployment_by_name("client-report/client-report")
        period = {"period_start": today.isoformat(), "period_end": today.isoformat()}
        runs = {}
        # NOTE: two deployments, since each of nightly-rollup's runs waits for the one before.
        async with (
            world.metrics_trigger(world.clients["a"], f"PERFORM pg_advisory_xact_lock({key_a});"),
            world.metrics_trigger(
                world.clients["b"],
                f"PERFORM pg_advisory_xact_lock({key_b});",
                table="client_reports",
            ),
        ):
            runs["a"] = await client.create_flow_run_from_deployment(
                rollup.id,
                parameters={
                    "day": today.isoformat(),
                    "client_ids": [str(world.clients["a"])],
                    "access_token": await world.sealed_rollup(today, clients=["a"]),
                },
            )
            runs["b"] = await client.create_flow_run_from_deployment(
                report.id,
                parameters={
                    "client_id": str(world.clients["b"]),
                    **period,
                    "access_token": await world.sealed(
                        "member_b", flow="client-report", clients=["b"], parameters=period
                    ),
                },
            )
            # Both runs are inside their client's transaction, each waiting for its lock.
            try:
                async with asyncio.timeout(180):
                    while True:
                        if await _waiting_on(world, key_a) and await _waiting_on(world, key_b):
                            break
                        await asyncio.sleep(0.2)
            except TimeoutError:
                states = [(await client.read_flow_run(run.id)).state for run in runs.values()]
                raise AssertionError(
                    f"the rollups never waited on their locks: {states}\n{container.logs()[-3000:]}"
                ) from None
            stopping = asyncio.ensure_future(asyncio.to_thread(container.stop, drain_s + 45))
            await asyncio.to_thread(container.wait_for_line, "taking no new flow runs", 30)
            # Taken by nobody: the only worker of the pool is stopping.
            noop = await client.read_deployment_by_name("noop/noop")
            late = await client.create_flow_run_from_deployment(noop.id)
            # a's run finishes within WORKER_DRAIN_S; b's is still waiting when it ends.
            await conn.execute("SELECT pg_advisory_unlock($1)", key_a)
            await stopping
            await conn.execute("SELECT pg_advisory_unlock($1)", key_b)
        finished = {who: await client.read_flow_run(run.id) for who, run in runs.items()}
        late = await client.read_flow_run(late.id)
        await client.delete_flow_run(late.id)
        async with asyncio.timeout(60):
            while True:
                limit = await client.read_global_concurrency_limit_by_name(db_limit)
                if limit.active_slots <= slots_before:
                    break
                await asyncio.sleep(0.5)
    exit_code = podman_exit_code(container)
    logs = container.logs()
    assert exit_code == 0, logs[-2000:]
    assert finished["a"].state_type == StateType.COMPLETED, finished["a"].state
    assert finished["b"].state_type == StateType.CRASHED, finished["b"].state
    assert late.state_type == StateType.SCHEDULED, late.state
    assert str(late.id) not in logs
    rows = await world.sql(
        "fetch",
        "SELECT client_id FROM public.client_daily_metrics WHERE client_id = ANY($1::uuid[]) "
        "AND day = $2",
        [world.clients["a"], world.clients["b"]],
        today,
    )
    assert [row["client_id"] for row in rows] == [world.clients["a"]]
    reports = await world.sql(
        "fetchval",
        "SELECT count(*) FROM public.client_reports WHERE flow_run_id = $1",
        runs["b"].id,
    )
    assert reports == 0, "the stopped report's transaction was committed"
    a, b = (f"'{finished[who].name}' ({finished[who].id})" for who in ("a", "b"))
    said = [line for line in logs.splitlines() if not re.match(r"^\d\d:\d\d:\d\d\.\d+ \|", line)]
    assert any(
        line.startswith("SIGTERM: stopping; taking no new flow runs; in flight: ")
        and a in line
        and b in line
        and f"{drain_s}s (WORKER_DRAIN_S)" in line
        for line in said
    ), said
    assert f"flow run {b} still running: sending it SIGTERM; it ends Crashed" in logs
    assert f"flow run {a} still running" not in logs
    assert f"flow run {b} stopped" in said
    assert said[-1].endswith("stopped!")


def podman_exit_code(container: Container) -> int:
    done = container.podman.run(
        "container", "inspect", "--format", "{{.State.ExitCode}}", container.name
    )
    return int(done.stdout.strip())


def _without(settings: dict[str, str], *names: str) -> dict[str, str]:
    return {key: value for key, value in settings.items() if key not in names}


def _bad_settings(stack: Stack, case: str) -> tuple[dict[str, str], list[str]]:
    """The settings of a bad case, and the command (empty: the image's own)."""
    good = tenant_worker_settings(stack.config)
    wrong_auth = f"tenantflow:{uuid.uuid4().hex}"
    public = public_key(stack.config.secrets.seal_private_key)
    cases: dict[str, tuple[dict[str, str], list[str]]] = {
        "no settings": ({}, []),
        "no DATABASE_URL": (_without(good, "DATABASE_URL"), []),
        "wrong PREFECT_API_AUTH_STRING": ({**good, "PREFECT_API_AUTH_STRING": wrong_auth}, []),
        "malformed SEAL_PRIVATE_KEYS": ({**good, "SEAL_PRIVATE_KEYS": '{"kty": "EC"}'}, []),
        "a public key as SEAL_PRIVATE_KEYS": ({**good, "SEAL_PRIVATE_KEYS": public}, []),
        "no SEAL_PRIVATE_KEYS": (_without(good, "SEAL_PRIVATE_KEYS"), []),
        "migrate pool without MIGRATION_DATABASE_URL": (
            good,
            ["tenantflow", "worker", "--pool", MIGRATE_POOL],
        ),
    }
    return cases[case]


_NAMED = {
    "no settings": "PREFECT_API_URL",
    "no DATABASE_URL": "DATABASE_URL",
    "wrong PREFECT_API_AUTH_STRING": "PREFECT_API_AUTH_STRING",
    "malformed SEAL_PRIVATE_KEYS": "SEAL_PRIVATE_KEYS",
    "a public key as SEAL_PRIVATE_KEYS": "SEAL_PRIVATE_KEYS",
    "no SEAL_PRIVATE_KEYS": "SEAL_PRIVATE_KEYS",
    "migrate pool without MIGRATION_DATABASE_URL": "MIGRATION_DATABASE_URL",
}


@pytest.mark.parametrize("case", list(_NAMED))
def test_a_worker_container_with_bad_settings_fails_in_one_line_naming_the_setting(
    case: str, stack: Stack, worker_container: Start
) -> None:
    settings, command = _bad_settings(stack, case)
    container = worker_container(settings, *command)
    assert container.wait_exit() != 0
    logs = container.logs()
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, logs
    assert logs.strip().splitlines()[-1] == errors[0]
    assert _NAMED[case] in errors[0], errors[0]
    assert STARTED not in logs, "the worker started with bad settings"
    secrets = stack.config.secrets
    for value in (
        secrets.worker_password,
        secrets.postgres_password,
        secrets.prefect_auth_string.partition(":")[2],
        settings.get("PREFECT_API_AUTH_STRING", ":").partition(":")[2],
        json.loads(secrets.seal_private_key)["d"],
    ):
        assert not value or value not in logs
