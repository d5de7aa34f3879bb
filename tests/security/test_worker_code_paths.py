"""No code from the API runs in the worker or in any process it starts, on any path.

Whoever reaches the Prefect API can patch a deployment the project declares
(`PATCH /deployments/{id}`): give it a pull step (`run_shell_script`) and an entrypoint of
their own, each writing a marker file when it runs. Prefect's process worker would run
both, in the worker, to load the flow for a cancelled or crashed run's hooks. Through the
stack's real worker, with `noop` and `client-report` patched that way: a run that
completes, a Pending and a Running run cancelled, a run whose process dies, one that
crashes on an unknown parameter, and a completed run retried or suspended and resumed
through the API (taken up again by the worker) leave no marker, and the hooks the
project declares ran, loaded from the declared flow (Prefect logs each hook it runs). A
tenant flow run's process holds nothing it does not need, `MIGRATION_DATABASE_URL` least
of all (read from `/proc` as root); a `migrate` run's does. A tenant deployment
re-pointed at the migrate pool is refused there before any process starts.

The runs are held still where a test needs them (Pending, or Running) by stopping their
process with SIGSTOP as soon as it exists, as root; a stopped process is continued once
the worker has sent it its SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import LogSort
from prefect.states import AwaitingRetry, Cancelling, Running, Suspended

from tenantflow.deployments import MIGRATE_POOL, WORK_POOLS
from tenantflow.flow_environment import BASIC_ENVIRONMENT
from tenantflow.settings import Settings
from tenantflow.tenancy import REDACTED
from tenantflow_dev import Stack
from tenantflow_dev.processes import descendants
from tenantflow_dev.worker import LocalWorker
from tests.forging import forge
from tests.world import World, world

__all__ = ["world"]

pytestmark = [
    pytest.mark.stack,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="holds flow-run processes still as root"),
]

TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
#: A JWT's shape (three base64url segments): what the declared redaction hook removes.
PLAIN_TOKEN = forge({"alg": "HS256"}, {"sub": "tenantflow"}, b"signature-of-a-test")
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


# --------------------------------------------------------------------------- the attack


@dataclass
class Attack:
    """What an attacker writes into a deployment, and the files its code would write."""

    folder: Path
    pull_marker: Path
    import_marker: Path

    @property
    def entrypoint(self) -> str:
        return f"{self.folder / 'evil.py'}:evil"

    @property
    def pull_steps(self) -> list[dict[str, Any]]:
        return [
            {"prefect.deployments.steps.run_shell_script": {"script": f"touch {self.pull_marker}"}}
        ]

    def assert_nothing_ran(self) -> None:
        assert not self.pull_marker.exists(), "the patched deployment's pull step ran"
        assert not self.import_marker.exists(), "the patched deployment's entrypoint was imported"


@pytest.fixture
def attack() -> Iterator[Attack]:
    # NOTE: in the machine's temporary folder, where the worker's OS user could read the
    # attacker's flow and write the markers, had anything of the patch run.
    tag = uuid.uuid4().hex[:12]
    folder = Path(tempfile.gettempdir()) / f"tenantflow-attack-{tag}"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    found = Attack(
        folder,
        Path(tempfile.gettempdir()) / f"tenantflow-marker-pull-{tag}",
        Path(tempfile.gettempdir()) / f"tenantflow-marker-import-{tag}",
    )
    (folder / "evil.py").write_text(
        f'"""The attacker\'s flow: it writes a marker as soon as it is imported."""\n'
        "from pathlib import Path\n\nfrom prefect import flow\n\n"
        f"Path({str(found.import_marker)!r}).touch()\n\n\n"
        '@flow(name="noop")\ndef evil() -> None:\n    pass\n'
    )
    (folder / "evil.py").chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    yield found
    for path in (found.folder / "evil.py", found.pull_marker, found.import_marker):
        path.unlink(missing_ok=True)
    found.folder.rmdir()


def _api(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.config.prefect_api_url,
        headers=stack.config.prefect_api_headers(),
        timeout=30,
    )


#: The deployment fields a patch changes and the restore puts back.
PATCHED = ("entrypoint", "pull_steps", "path", "work_pool_name", "work_queue_name")


@asynccontextmanager
async def patched(stack: Stack, name: str, **changes: Any) -> AsyncIterator[dict[str, Any]]:
    """The deployment `name/name` patched through the API with `changes`; restored after."""
    async with _api(stack) as api:
        found = await api.get(f"/deployments/name/{name}/{name}")
        found.raise_for_status()
        original = found.json()
        answer = await api.patch(f"/deployments/{original['id']}", json=changes)
        assert answer.status_code == 204, answer.text
        now = (await api.get(f"/deployments/{original['id']}")).json()
        assert {key: now[key] for key in changes} == changes
        try:
            yield original
        finally:
            restore = {key: original[key] for key in PATCHED}
            answer = await api.patch(f"/deployments/{original['id']}", json=restore)
            assert answer.status_code == 204, answer.text
            back = (await api.get(f"/deployments/{original['id']}")).json()
            assert {key: back[key] for key in PATCHED} == restore


async def still_patched(stack: Stack, deployment_id: str, changes: dict[str, Any]) -> None:
    """The patch was in place while the run went through (no redeploy undid the attack)."""
    async with _api(stack) as api:
        now = (await api.get(f"/deployments/{deployment_id}")).json()
    assert {key: now[key] for key in changes} == changes


# --------------------------------------------------------------------------- processes


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(): value.decode(errors="replace") for key, value in pairs}


def _catch(worker: LocalWorker, run_id: UUID, deadline: float) -> int:
    """Stop (SIGSTOP) the flow-run process of `run_id` as soon as it has started."""
    wanted = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    worker_pid = worker.pid()
    assert worker_pid is not None
    while time.monotonic() < deadline:
        for pid in descendants(worker_pid):
            try:
                # NOTE: between fork and exec a child still shows the worker's environment.
                if wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(pid, signal.SIGSTOP)
                    return pid
            except (OSError, ProcessLookupError):
                continue
        time.sleep(0.005)
    raise AssertionError(f"no flow-run process of {run_id} under the worker")


async def held_process(worker: LocalWorker, run_id: UUID) -> int:
    """The flow-run process of `run_id`, stopped before Prefect's engine has loaded."""
    return await asyncio.to_thread(_catch, worker, run_id, time.monotonic() + 120)


def _sigterm_pending(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"SigPnd", "ShdPnd"} and int(value.strip(), 16) & SIGTERM_BIT:
            return True
    return False


async def continue_once_terminated(pid: int) -> None:
    """Wait for the worker's SIGTERM to the stopped process, then let it take it."""
    async with asyncio.timeout(120):
        while True:
            if _sigterm_pending(pid):
                break
            await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGCONT)


def with_sigkill(pid: int) -> None:
    """Make sure a held process is gone, whatever the test did with it."""
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- runs


async def wait_for(client: PrefectClient, run_id: UUID, states: set[StateType]) -> FlowRun:
    async with asyncio.timeout(180):
        while True:
            run = await client.read_flow_run(run_id)
            if run.state_type in states:
                return run
            await asyncio.sleep(0.3)


async def log_lines(client: PrefectClient, run_id: UUID) -> list[str]:
    logs = await client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
        sort=LogSort.TIMESTAMP_ASC,
    )
    return [log.message for log in logs]


async def hook_ran(client: PrefectClient, run_id: UUID, hook: str, state: str) -> list[str]:
    """The run's logs once they say the declared `hook` finished for `state`."""
    wanted = f"Hook {hook!r} finished running successfully"
    async with asyncio.timeout(60):
        while True:
            lines = await log_lines(client, run_id)
            if wanted in lines:
                # Once: by the worker; the engine's own run of these hooks is turned off.
                running = f"Running hook {hook!r} in response to entering state {state!r}"
                assert lines.count(running) == 1, lines
                return lines
            await asyncio.sleep(0.5)


def no_code_from_the_api(lines: list[str]) -> None:
    """Neither the patched deployment's steps nor the tripwire show in the run's logs."""
    text = "\n".join(lines)
    assert "pull step" not in text
    assert "failed to retrieve flow" not in text, text
    assert "refused: Prefect tried to load" not in text


async def stored_run(stack: Stack, deployment: str, parameters: dict[str, Any]) -> UUID:
    """A run of `deployment` stored as the API allows (`POST /flow_runs/`): no schema check."""
    async with get_client() as client:
        found = await client.read_deployment_by_name(f"{deployment}/{deployment}")
    async with _api(stack) as api:
        created = await api.post(
            "/flow_runs/",
            json={
                "flow_id": str(found.flow_id),
                "deployment_id": str(found.id),
                "work_pool_name": found.work_pool_name,
                "work_queue_name": found.work_queue_name,
                "parameters": parameters,
                "state": {"type": "SCHEDULED", "name": "Scheduled"},
            },
        )
    assert created.status_code == 201, created.text
    return UUID(created.json()["id"])


def report_parameters(world: World) -> dict[str, Any]:
    today = str(datetime.now(UTC).date())
    return {
        "client_id": str(world.clients["a"]),
        "period_start": today,
        "period_end": today,
        "access_token": PLAIN_TOKEN,
    }


# --------------------------------------------------------------------------- the paths


async def test_a_patched_deployment_runs_the_declared_flow(stack: Stack, attack: Attack) -> None:
    changes = {"entrypoint": attack.entrypoint, "pull_steps": attack.pull_steps}
    async with patched(stack, "noop", **changes) as deployment, get_client() as client:
        run = await client.create_flow_run_from_deployment(deployment["id"])
        done = await wait_for(client, run.id, TERMINAL)
        await still_patched(stack, deployment["id"], changes)
        lines = await log_lines(client, run.id)
    assert done.state_type == StateType.COMPLETED, done.state
    no_code_from_the_api(lines)
    attack.assert_nothing_ran()


@pytest.mark.parametrize("phase", ["pending", "running"])
async def test_a_cancelled_run_runs_the_declared_hooks(
    stack: Stack, attack: Attack, phase: str
) -> None:
    """Prefect's worker loads the flow from the API for on_cancellation hooks."""
    worker = LocalWorker(stack.config)
    changes = {"entrypoint": attack.entrypoint, "pull_steps": attack.pull_steps}
    async with patched(stack, "noop", **changes) as deployment, get_client() as client:
        run = await client.create_flow_run_from_deployment(deployment["id"])
        pid = await held_process(worker, run.id)
        try:
            held = await wait_for(client, run.id, {StateType.PENDING, StateType.RUNNING})
            assert held.state_type == StateType.PENDING, "its process is held before Running"
            if phase == "running":
                await client.set_flow_run_state(run.id, Running(), force=True)
            # As the UI's Cancel button does.
            await client.set_flow_run_state(run.id, Cancelling(), force=True)
            await continue_once_terminated(pid)
        except BaseException:
            with_sigkill(pid)
            raise
        done = await wait_for(client, run.id, TERMINAL)
        lines = await hook_ran(client, run.id, "nothing_to_release", "Cancelling")
        await still_patched(stack, deployment["id"], changes)
    assert done.state_type == StateType.CANCELLED, done.state
    no_code_from_the_api(lines)
    attack.assert_nothing_ran()


@pytest.mark.parametrize("crash", ["killed", "unknown-parameter"])
async def test_a_crashed_run_runs_the_declared_crash_hooks(
    stack: Stack, world: World, attack: Attack, crash: str
) -> None:
    """The worker's on_crashed hooks: `client-report`'s token redaction, from the declared
    flow (the attacker's has none), removes the plain token the run was stored with. The
    run crashes as its process is killed, or as its engine exits on a parameter the flow
    does not take (a run stored around the schema)."""
    worker = LocalWorker(stack.config)
    parameters = report_parameters(world)
    if crash == "unknown-parameter":
        parameters["bogus"] = 1
    changes = {"entrypoint": attack.entrypoint, "pull_steps": attack.pull_steps}
    async with patched(stack, "client-report", **changes) as deployment, get_client() as client:
        run_id = await stored_run(stack, "client-report", parameters)
        if crash == "killed":
            with_sigkill(await held_process(worker, run_id))
        done = await wait_for(client, run_id, TERMINAL)
        lines = await hook_ran(client, run_id, "redact_token_on_failure", "Crashed")
        stored = (await client.read_flow_run(run_id)).parameters
        await still_patched(stack, deployment["id"], changes)
    assert done.state_type == StateType.CRASHED, done.state
    assert stored["access_token"] == REDACTED
    no_code_from_the_api(lines)
    attack.assert_nothing_ran()


@pytest.mark.parametrize("again", ["retried", "resumed"])
async def test_a_retried_or_resumed_run_runs_the_declared_flow_again(
    stack: Stack, attack: Attack, again: str
) -> None:
    """A run put back to Scheduled through the API after it ran (retried as the UI's Retry
    does, or suspended and resumed: Prefect's resume of a suspended run schedules it
    again) is a new attempt that the worker takes up again: on the declared flow too."""
    changes = {"entrypoint": attack.entrypoint, "pull_steps": attack.pull_steps}
    async with patched(stack, "noop", **changes) as deployment, get_client() as client:
        run = await client.create_flow_run_from_deployment(deployment["id"])
        first = await wait_for(client, run.id, TERMINAL)
        assert first.state_type == StateType.COMPLETED, first.state
        if again == "retried":
            await client.set_flow_run_state(run.id, AwaitingRetry(), force=True)
        else:
            await client.set_flow_run_state(run.id, Suspended(timeout_seconds=600), force=True)
            resumed = await client.resume_flow_run(run.id)
            assert resumed.status == SetStateStatus.ACCEPT, resumed
        # NOTE: a resumed run keeps its run_count; its second Completed state tells it ran.
        async with asyncio.timeout(180):
            while True:
                states = await client.read_flow_run_states(run.id)
                if [state.type for state in states].count(StateType.COMPLETED) >= 2:
                    break
                await asyncio.sleep(0.3)
        done = await client.read_flow_run(run.id)
        await still_patched(stack, deployment["id"], changes)
        lines = await log_lines(client, run.id)
    assert done.state_type == StateType.COMPLETED, done.state
    assert [state.type for state in states].count(StateType.COMPLETED) == 2
    assert [state.type for state in states].count(StateType.RUNNING) == 2
    taken_up_as = {"retried": "AwaitingRetry", "resumed": "Resuming"}[again]
    assert taken_up_as in [state.name for state in states]
    no_code_from_the_api(lines)
    attack.assert_nothing_ran()


async def test_the_patch_is_code_prefects_own_loader_runs(stack: Stack, attack: Attack) -> None:
    """The control: what the tests above patch in is what Prefect's worker would run.

    Prefect's `load_flow_from_flow_run` (what its process worker resolves hooks with), in a
    process of its own without the tripwire, runs the pull step and imports the entrypoint.
    """
    changes = {"entrypoint": attack.entrypoint, "pull_steps": attack.pull_steps}
    script = (
        "import asyncio, sys\n"
        "from uuid import UUID\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.flows import load_flow_from_flow_run\n"
        "async def main():\n"
        "    async with get_client() as client:\n"
        "        run = await client.read_flow_run(UUID(sys.argv[1]))\n"
        "    await load_flow_from_flow_run(run)\n"
        "asyncio.run(main())\n"
    )
    async with patched(stack, "noop", **changes) as deployment, _api(stack) as api:
        # NOTE: created Cancelled, so no worker ever picks it up.
        created = await api.post(
            "/flow_runs/",
            json={
                "flow_id": deployment["flow_id"],
                "deployment_id": deployment["id"],
                "state": {"type": "CANCELLED", "name": "Cancelled"},
            },
        )
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        try:
            with tempfile.TemporaryDirectory() as folder:
                loaded = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-c", script, run_id],
                    cwd=folder,
                    env={**os.environ, **stack.config.environment()},
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
        finally:
            await api.delete(f"/flow_runs/{run_id}")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert attack.pull_marker.exists() and attack.import_marker.exists()
    attack.pull_marker.unlink()
    attack.import_marker.unlink()


# --------------------------------------------------------------------------- environments


def _secrets(stack: Stack) -> dict[str, str]:
    """Values no tenant worker or tenant flow run may hold, whatever the variable is called."""
    secrets = stack.config.secrets
    return {
        "the schema owner's password": secrets.postgres_password,
        "the cluster superuser's password": secrets.admin_password,
        "the legacy JWT secret": secrets.jwt_secret,
        "the Prefect database's password": secrets.prefect_db_password,
        "Supabase's service-role key": secrets.service_role_key,
    }


async def _environment_of_a_run(
    stack: Stack, worker: LocalWorker, deployment: str, parameters: dict[str, Any]
) -> tuple[dict[str, str], FlowRun]:
    """The whole environment of a run's flow-run process, read while it is held."""
    run_id = await stored_run(stack, deployment, parameters)
    pid = await held_process(worker, run_id)
    try:
        env = environment_of(pid)
    finally:
        os.kill(pid, signal.SIGCONT)
    async with get_client() as client:
        done = await wait_for(client, run_id, TERMINAL)
    return env, done


async def test_a_tenant_flow_run_holds_only_what_it_needs(stack: Stack) -> None:
    worker = LocalWorker(stack.config)
    worker_pid = worker.pid()
    assert worker_pid is not None
    worker_env = environment_of(worker_pid)
    assert "MIGRATION_DATABASE_URL" not in worker_env
    for what, value in _secrets(stack).items():
        assert value not in "\0".join(worker_env.values()), f"the worker holds {what}"
    env, done = await _environment_of_a_run(stack, worker, "noop", {})
    assert done.state_type == StateType.COMPLETED, done.state
    assert "MIGRATION_DATABASE_URL" not in env
    text = "\0".join(env.values())
    for what, value in _secrets(stack).items():
        assert value not in text, what
    # What it does need: the workers' login, the seal keys, the API.
    assert env["DATABASE_URL"] == stack.config.database_url
    assert env["SEAL_PRIVATE_KEYS"] == stack.config.secrets.seal_private_key
    assert env["PREFECT_API_URL"] == stack.config.prefect_api_url
    assert env["PREFECT__FLOW_ENTRYPOINT"] == f"{stack.config.project_dir / 'flows/noop.py'}:noop"
    settings = {name.upper() for name in Settings.model_fields} - {"MIGRATION_DATABASE_URL"}
    strays = {
        key
        for key in env
        if key not in settings | BASIC_ENVIRONMENT and not key.startswith(("PREFECT_", "LC_"))
    }
    assert strays == set()
    server_only = [key for key in env if key.startswith("PREFECT_SERVER_")]
    assert server_only == []


async def test_only_the_migrate_workers_runs_hold_the_migration_login(stack: Stack) -> None:
    worker = LocalWorker.for_migrate(stack.config)
    worker_pid = worker.pid()
    assert worker_pid is not None
    url = stack.config.migration_database_url
    assert environment_of(worker_pid)["MIGRATION_DATABASE_URL"] == url
    # A migrate run without a token: refused by the flow, after its process has started.
    env, done = await _environment_of_a_run(stack, worker, "migrate", {"dry_run": True})
    assert done.state_type in {StateType.FAILED, StateType.CRASHED}, done.state
    assert env["MIGRATION_DATABASE_URL"] == url


async def test_a_tenant_deployment_moved_to_the_migrate_pool_is_refused_there(
    stack: Stack,
) -> None:
    """Whoever moves `client-report` onto the migrate pool does not get the migrate worker
    (and its owner's login) to run it: the run ends Crashed before any process starts."""
    changes = {"work_pool_name": MIGRATE_POOL, "work_queue_name": "default"}
    async with patched(stack, "client-report", **changes):
        # NOTE: the deployment is put back as soon as the run exists (other tests run
        # client-report); the run keeps the migrate pool's queue.
        run_id = await stored_run(stack, "client-report", {})
    async with get_client() as client:
        assert (await client.read_flow_run(run_id)).work_pool_name == MIGRATE_POOL
        done = await wait_for(client, run_id, TERMINAL)
    assert done.state_type == StateType.CRASHED, done.state
    message = done.state.message or ""
    assert "deployment 'client-report' is declared for work pool" in message, message
    assert f"{WORK_POOLS['process']!r}" in message
    assert f"not for this worker's pool {MIGRATE_POOL!r}" in message
    assert done.infrastructure_pid is None
