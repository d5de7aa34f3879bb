"""The docker pool for real: podman's Docker API serving the tenantflow docker worker.

`podman system service` (`tenantflow_dev.docker_api`) serves the Docker API on a socket of
the test's, with the dev stack's podman storage, so the worker image is the one the tests
built. The tenantflow docker worker (`tenantflow worker --pool tenantflow-docker`, a
process here, as an operator runs it beside a Docker engine) serves `tenantflow-docker`,
onto which the test moves the project's `client-report` and `noop` deployments (and back
afterwards). Each flow run is a container of its own, on the host network (the stack
listens on 127.0.0.1: the worker's setting, never a job variable).

What the API can say and what happens:

* job variables the worker's template lacks (image, command, volumes, networks, network
  mode, container_create_kwargs (user), privileged), asked by a run after the pool's
  template on the server was widened to Prefect's own so the server takes them: each run
  ends Crashed naming the variable, and no container of it exists;
* the pool's template on the server rewritten to another image, command, volume, network,
  user and privileged mode: ignored, the run's container is the worker's own;
* a deployment the project does not declare, or `migrate` moved onto the pool: Crashed
  before any container; the image refuses `migrate` by itself as well;
* a running run cancelled: its container stopped, the run Cancelled; the worker stopped
  with a run in flight: it exits at once, the container goes on and completes the run.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from dotenv import dotenv_values
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling
from prefect_docker.worker import DockerWorker  # type: ignore[import-untyped]

from tenantflow.container_jobs import IMAGE_ENV, SETTINGS_MOUNT, container_settings
from tenantflow.deployments import MIGRATE_POOL, WORK_POOLS, PoolType, base_job_template
from tenantflow.docker_worker import NETWORK_MODE_ENV
from tenantflow.flow_environment import MIGRATION_ENV
from tenantflow.project import PROJECT_DIR_ENV
from tenantflow_dev import Stack
from tenantflow_dev.docker_api import DockerApi
from tenantflow_dev.image import BuiltImage
from tenantflow_dev.podman import Podman
from tenantflow_dev.worker_container import tenant_worker_settings
from tests.deployments.test_alerts import TERMINAL, _wait_for
from tests.image.conftest import PROJECT, STARTED
from tests.world import EVENTS_PER_CLIENT, World

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("db_limit")]

POOL = WORK_POOLS["docker"]
#: The project's deployments the tests move onto the docker pool (and back).
MOVED = ("client-report", "noop")
#: The settings a flow-run container must never show (in its environment, its command).
SECRETS = (
    "DATABASE_URL",
    "SUPABASE_ANON_KEY",
    "SEAL_PRIVATE_KEYS",
    "PREFECT_API_AUTH_STRING",
)
#: Docker's form of Prefect's `prefect.io/flow-run-id` label (prefect-docker reverses it).
RUN_LABEL = "io.prefect.flow-run-id"
RUN_S = 240


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def docker_api(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerApi]:
    with DockerApi(podman, tmp_path_factory.mktemp("docker-api")) as api:
        yield api


async def _ensure_pool(client: PrefectClient, template: dict[str, Any]) -> None:
    try:
        await client.read_work_pool(POOL)
    except ObjectNotFound:
        await client.create_work_pool(
            WorkPoolCreate(name=POOL, type="docker", base_job_template=template)
        )
    else:
        await client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=template))


@pytest.fixture(scope="module")
def pool_template(worker_image: BuiltImage) -> dict[str, Any]:
    """What the bootstrap gives `tenantflow-docker` (the image baked in)."""
    return base_job_template("docker", PROJECT, image=worker_image.reference)


@pytest.fixture(scope="module")
def docker_pool(stack: Stack, pool_template: dict[str, Any]) -> Iterator[str]:
    """The docker pool, with `MOVED` deployed onto it; afterwards back on their pool."""

    async def move(pool: str) -> None:
        async with get_client() as client:
            if pool == POOL:
                await _ensure_pool(client, pool_template)
            for name in MOVED:
                deployment = await client.read_deployment_by_name(f"{name}/{name}")
                await client.update_deployment(deployment.id, DeploymentUpdate(work_pool_name=pool))

    asyncio.run(move(POOL))
    try:
        yield POOL
    finally:
        asyncio.run(move(WORK_POOLS["process"]))


@pytest.fixture
async def restore_pool_template(pool_template: dict[str, Any]) -> AsyncIterator[None]:
    yield
    async with get_client() as client:
        await client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=pool_template))


class DockerWorkerProcess:
    """`tenantflow worker --pool tenantflow-docker` as a process of the test's."""

    def __init__(self, env: dict[str, str], log: Path, name: str) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tenantflow.cli", "worker", "--pool", POOL, "--name", name],
                env=env,
                cwd=PROJECT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if STARTED in self.output():
                return
            assert self.process.poll() is None, self.output()[-3000:]
            time.sleep(0.3)
        raise AssertionError(f"the docker worker did not start:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@pytest.fixture(scope="module")
def docker_worker(
    stack: Stack,
    docker_api: DockerApi,
    docker_pool: str,
    worker_image: BuiltImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DockerWorkerProcess]:
    folder = tmp_path_factory.mktemp("docker-worker")
    worker = DockerWorkerProcess(
        _worker_environment(stack, docker_api, worker_image),
        folder / "worker.log",
        f"docker-test-{uuid.uuid4().hex[:6]}",
    )
    try:
        worker.wait_started()
        yield worker
    finally:
        worker.stop()
        sys.stderr.write(f"\ndocker worker log: {worker.log}\n")


def _worker_environment(stack: Stack, docker_api: DockerApi, image: BuiltImage) -> dict[str, str]:
    """The docker worker's environment: a tenant worker's settings, the Docker API, its
    project, the flow runs' image and the host network (the stack is on 127.0.0.1)."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        **tenant_worker_settings(stack.config),
        **docker_api.environment(),
        PROJECT_DIR_ENV: str(PROJECT),
        IMAGE_ENV: image.reference,
        NETWORK_MODE_ENV: "host",
    }


# --------------------------------------------------------------------------- helpers


async def _start(name: str, **options: Any) -> FlowRun:
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(f"{name}/{name}")
        return await client.create_flow_run_from_deployment(deployment.id, **options)


async def _ended(run: FlowRun, seconds: float = RUN_S) -> FlowRun:
    async with get_client() as client:
        ended: FlowRun = await _wait_for(client, run.id, TERMINAL, seconds)
        return ended


def _containers_of(podman: Podman, run: FlowRun) -> list[dict[str, Any]]:
    """`podman inspect` of every container of `run`, once it has exited (a run is Completed
    a moment before its container exits)."""
    ids = podman.run(
        "ps", "--all", "--quiet", "--filter", f"label={RUN_LABEL}={run.id}"
    ).stdout.split()
    if not ids:
        return []
    podman.run("wait", *ids, timeout=60)
    inspected: list[dict[str, Any]] = json.loads(podman.run("inspect", *ids).stdout)
    return inspected


def _remove(podman: Podman, containers: list[dict[str, Any]]) -> None:
    for container in containers:
        podman.remove(container["Id"], stop_seconds=1)


def _assert_the_workers_own(
    podman: Podman,
    container: dict[str, Any],
    image: BuiltImage,
    deployment: str,
    secrets: dict[str, str],
) -> None:
    """The container is what the worker makes, whatever the API asked for."""
    config, host = container["Config"], container["HostConfig"]
    assert config["Image"] in (image.reference, f"localhost/{image.reference}")
    assert container["Image"] == podman.image_id(image.reference)
    assert config["Cmd"] == ["python", "-m", "tenantflow.container_run", deployment]
    assert config["User"] == "10001:10001"
    assert host["Privileged"] is False
    assert host["NetworkMode"] == "host"
    # NOTE: podman lists `--cap-drop ALL` as each capability a container would have had.
    assert {"CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_NET_RAW"} <= set(host["CapDrop"])
    assert not host.get("CapAdd")
    assert "no-new-privileges" in host["SecurityOpt"]
    (mount,) = container["Mounts"]
    assert mount["Destination"] == SETTINGS_MOUNT and mount["RW"] is False
    names = {entry.partition("=")[0] for entry in config["Env"]}
    assert not names & {*SECRETS, MIGRATION_ENV}, names
    text = json.dumps(container)
    for key, value in secrets.items():
        assert value not in text, f"{key}'s value shows in podman inspect"


def _offline(podman: Podman, image: BuiltImage, *command: str) -> subprocess.CompletedProcess[str]:
    """`command` in a fresh container of the image, without a network."""
    return podman.run("run", "--rm", "--network", "none", image.reference, *command, check=False)


# --------------------------------------------------------------------------- tests


def test_the_image_refuses_migrate_and_undeclared_deployments_by_itself(
    podman: Podman, worker_image: BuiltImage
) -> None:
    for name in ("migrate", "rogue"):
        done = _offline(podman, worker_image, "python", "-m", "tenantflow.container_run", name)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "refused:" in done.stderr
        assert (MIGRATE_POOL if name == "migrate" else "is not declared") in done.stderr


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_the_image_says_which_extra_a_container_pools_worker_needs(
    podman: Podman, worker_image: BuiltImage, kind: PoolType
) -> None:
    """The image holds the process worker only: the container workers run where the
    `docker` or `kubernetes` extra is installed (beside the Docker engine, in the cluster)."""
    done = _offline(podman, worker_image, "tenantflow", "worker", "--pool", WORK_POOLS[kind])
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"needs the {kind} extra" in done.stderr and "Traceback" not in done.stderr


def test_the_worker_stops_in_one_line_when_the_docker_api_does_not_answer(
    stack: Stack,
    docker_api: DockerApi,
    docker_pool: str,
    worker_image: BuiltImage,
    tmp_path: Path,
) -> None:
    env = {
        **_worker_environment(stack, docker_api, worker_image),
        "DOCKER_HOST": f"unix://{tmp_path / 'nothing-here.sock'}",
    }
    worker = DockerWorkerProcess(env, tmp_path / "worker.log", "docker-test-no-api")
    try:
        code = worker.process.wait(120)
    finally:
        worker.stop()
    output = worker.output()
    assert code != 0, output[-2000:]
    assert "does not answer" in output and "DOCKER_HOST" in output, output[-2000:]
    assert "Traceback" not in output
    assert STARTED not in output


async def test_client_report_runs_in_a_container_of_its_own_without_a_secret_in_sight(
    world: World,
    stack: Stack,
    podman: Podman,
    worker_image: BuiltImage,
    docker_worker: DockerWorkerProcess,
) -> None:
    today = datetime.now(UTC).date()
    period = {"period_start": today - timedelta(days=2), "period_end": today}
    token = await world.token("member_a")
    sealed = world.seal(token, flow="client-report", clients=["a"], parameters=period)
    run = await _start(
        "client-report",
        parameters={"client_id": world.clients["a"], **period, "access_token": sealed},
        # NOTE: kept after its end, to be inspected.
        job_variables={"auto_remove": False},
    )
    ended = await _ended(run)
    containers = _containers_of(podman, run)
    try:
        assert ended.state_type == StateType.COMPLETED, (
            ended.state.message if ended.state else None,
            docker_worker.output()[-3000:],
        )
        assert ended.labels.get("prefect.worker.name") == docker_worker.name
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
        markdown = next(a for a in artifacts if a.type == "markdown")
        assert f"Events: **{EVENTS_PER_CLIENT}**" in str(markdown.data)

        (container,) = containers
        settings = tenant_worker_settings(stack.config)
        secrets = {key: settings[key] for key in SECRETS}
        secrets[MIGRATION_ENV] = stack.config.migration_database_url
        secrets["access token"] = token
        _assert_the_workers_own(podman, container, worker_image, "client-report", secrets)
        assert container["State"]["ExitCode"] == 0

        # The settings reach the container by its read-only file, the owner's login never.
        (mount,) = container["Mounts"]
        held = dotenv_values(mount["Source"])
        assert MIGRATION_ENV not in held
        assert held == container_settings(settings)
        assert {key: held[key] for key in SECRETS} == {key: settings[key] for key in SECRETS}

        # Nor does the API hold them: not in the run, its deployment or the pool.
        async with get_client() as client:
            stored = await client.read_flow_run(run.id)
            pool = await client.read_work_pool(POOL)
            deployment = await client.read_deployment(run.deployment_id)  # type: ignore[arg-type]
        api_text = json.dumps(
            [
                stored.model_dump(mode="json"),
                pool.model_dump(mode="json"),
                deployment.model_dump(mode="json"),
            ]
        )
        for key, value in secrets.items():
            assert value not in api_text, f"{key}'s value is stored in the Prefect API"
    finally:
        _remove(podman, containers)


#: Job variables the worker's template lacks, each asking for a container of another kind.
HOSTILE: dict[str, dict[str, Any]] = {
    "image": {"image": "docker.io/library/alpine:3.20"},
    "command": {"command": "sh -c 'echo pwned'"},
    "volumes": {"volumes": ["/:/host:rw"]},
    "networks": {"networks": ["podman"]},
    "network_mode": {"network_mode": "bridge"},
    "user": {"container_create_kwargs": {"user": "0:0"}},
    "privileged": {"privileged": True},
}


async def test_job_variables_the_workers_template_lacks_crash_the_run_before_any_container(
    podman: Podman,
    docker_worker: DockerWorkerProcess,
    restore_pool_template: None,
) -> None:
    # NOTE: the pool's template on the server widened to Prefect's own, whose schema takes
    # them all: the server no longer refuses them (422), the worker has to.
    async with get_client() as client:
        await client.update_work_pool(
            POOL,
            WorkPoolUpdate(base_job_template=DockerWorker.get_default_base_job_template()),
        )
    runs = {
        asked: await _start("noop", job_variables=variables) for asked, variables in HOSTILE.items()
    }
    ended = dict(
        zip(runs, await asyncio.gather(*(_ended(run) for run in runs.values())), strict=True)
    )
    for asked, run in ended.items():
        message = run.state.message if run.state else ""
        assert run.state_type == StateType.CRASHED, (asked, run.state_type, message)
        (variable,) = HOSTILE[asked]
        assert "refused" in (message or "") and repr(variable) in (message or ""), message
        assert _containers_of(podman, runs[asked]) == [], f"a container was made for {asked}"


async def test_the_pools_template_rewritten_through_the_api_is_not_what_the_worker_runs(
    stack: Stack,
    podman: Podman,
    worker_image: BuiltImage,
    docker_worker: DockerWorkerProcess,
    pool_template: dict[str, Any],
    restore_pool_template: None,
) -> None:
    hostile = copy.deepcopy(pool_template)
    hostile["job_configuration"].update(
        {
            "image": "docker.io/library/alpine:3.20",
            "command": "sh -c 'echo pwned'",
            "volumes": ["/:/host:rw"],
            "networks": ["podman"],
            "privileged": True,
            "container_create_kwargs": {"user": "0:0", "cap_add": ["SYS_ADMIN"]},
            "env": {"PREFECT_API_AUTH_STRING": "stolen"},
            "auto_remove": False,
        }
    )
    async with get_client() as client:
        await client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=hostile))
    run = await _start("noop", job_variables={"auto_remove": False})
    ended = await _ended(run)
    containers = _containers_of(podman, run)
    try:
        assert ended.state_type == StateType.COMPLETED, ended.state.message if ended.state else None
        (container,) = containers
        settings = tenant_worker_settings(stack.config)
        _assert_the_workers_own(
            podman, container, worker_image, "noop", {key: settings[key] for key in SECRETS}
        )
        assert "SYS_ADMIN" not in json.dumps(container["HostConfig"].get("CapAdd") or [])
    finally:
        _remove(podman, containers)


async def test_undeclared_deployments_and_migrate_crash_before_any_container(
    podman: Podman, docker_worker: DockerWorkerProcess
) -> None:
    async with get_client() as client:
        noop = await client.read_deployment_by_name("noop/noop")
        rogue_id = await client.create_deployment(
            flow_id=noop.flow_id,
            name=f"rogue-{uuid.uuid4().hex[:6]}",
            work_pool_name=POOL,
            entrypoint="flows/noop.py:noop",
        )
        migrate = await client.read_deployment_by_name("migrate/migrate")
        await client.update_deployment(migrate.id, DeploymentUpdate(work_pool_name=POOL))
        try:
            rogue = await client.create_flow_run_from_deployment(rogue_id)
            # NOTE: sealed-token-shaped only: the run never gets as far as its flow.
            moved = await client.create_flow_run_from_deployment(
                migrate.id, parameters={"access_token": "never.opened.in.a.container"}
            )
            ended = await asyncio.gather(_ended(rogue), _ended(moved))
        finally:
            await client.update_deployment(
                migrate.id, DeploymentUpdate(work_pool_name=MIGRATE_POOL)
            )
            await client.delete_deployment(rogue_id)
    for run, reason in zip(ended, ("is not declared", MIGRATE_POOL), strict=True):
        message = run.state.message if run.state else ""
        assert run.state_type == StateType.CRASHED, (run.state_type, message)
        assert reason in (message or ""), message
        assert _containers_of(podman, run) == []


@asynccontextmanager
async def _client_reports_locked(world: World) -> AsyncIterator[asyncpg.Connection]:
    """`client_reports` locked (a report's row waits), released on the way out."""
    conn = await world.admin()
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE public.client_reports IN ACCESS EXCLUSIVE MODE")
            yield conn
    finally:
        await conn.close()


async def _waiting_on_the_lock(conn: asyncpg.Connection) -> None:
    async with asyncio.timeout(RUN_S):
        while not await conn.fetchval(  # noqa: ASYNC110 (polling the database)
            "SELECT count(*) FROM pg_locks WHERE NOT granted "
            "AND relation = 'public.client_reports'::regclass"
        ):
            await asyncio.sleep(0.2)


async def _blocked_report(
    world: World, conn: asyncpg.Connection, podman: Podman
) -> tuple[FlowRun, str]:
    """A client-report run in flight in its container (the run, the container's id), its
    report's row waiting on `conn`'s lock."""
    today = datetime.now(UTC).date()
    period = {"period_start": today, "period_end": today}
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"], parameters=period)
    run = await _start(
        "client-report",
        parameters={"client_id": world.clients["a"], **period, "access_token": sealed},
    )
    await _waiting_on_the_lock(conn)
    (container,) = podman.run(
        "ps", "--quiet", "--filter", f"label={RUN_LABEL}={run.id}"
    ).stdout.split()
    return run, container


async def test_a_running_run_cancelled_through_the_api_stops_its_container(
    world: World, podman: Podman, docker_worker: DockerWorkerProcess
) -> None:
    async with _client_reports_locked(world) as conn:
        run, container = await _blocked_report(world, conn, podman)
        async with get_client() as client:
            await client.set_flow_run_state(run.id, Cancelling(), force=True)
            # NOTE: the engine in the stopped container reports Crashed first; the worker
            # then marks the run Cancelled.
            try:
                ended = await _wait_for(client, run.id, {StateType.CANCELLED}, 60)
            except TimeoutError:
                ended = await client.read_flow_run(run.id)
        assert ended.state_type == StateType.CANCELLED, (
            ended.state,
            docker_worker.output()[-2000:],
        )
        assert "its container was stopped" in (ended.state.message or "")
        assert not podman.container_running(container)


#: How soon a stopped docker worker must be gone (it waits for no run: containers go on).
STOP_S = 15


async def test_a_stopped_worker_exits_at_once_and_its_runs_container_still_completes_it(
    world: World,
    podman: Podman,
    docker_worker: DockerWorkerProcess,
) -> None:
    """Last in this module: it stops the module's worker."""
    async with _client_reports_locked(world) as conn:
        run, container = await _blocked_report(world, conn, podman)
        stopping = time.monotonic()
        os.killpg(docker_worker.process.pid, signal.SIGTERM)
        code = await asyncio.to_thread(docker_worker.process.wait, STOP_S)
        assert code == 0, docker_worker.output()[-2000:]
        assert time.monotonic() - stopping < STOP_S
        assert "SIGTERM: stopping" in docker_worker.output()
        assert podman.container_running(container)
    ended = await _ended(run)
    assert ended.state_type == StateType.COMPLETED, ended.state.message if ended.state else None
