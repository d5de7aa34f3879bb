"""Faults: zombie flow runs are marked Crashed, and operators hear about nightly-rollup.

Through the real stack: a worker of its own (a pool of its own, a temporary project whose
prefect.yaml declares a sleepy flow) is SIGKILLed with its flow-run process, as a dying
machine would be; and a nightly-rollup run refused by its guard makes the Prefect server
POST a notification to a receiver in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyOptions, StateType
from prefect.events.schemas.automations import EventTrigger, Posture

from tenantflow.automations import AUTOMATIONS, Alerts, alert_automations, zombie_automation
from tenantflow.deployments import BootstrapResult, abootstrap
from tenantflow.settings import SettingsError, load_fault_settings
from tenantflow.worker import HEARTBEAT_ENV
from tenantflow_dev import Stack
from tenantflow_dev.demo import DEMO_MEMBER, sealed_token
from tenantflow_dev.os_users import grant_traversal
from tenantflow_dev.prefect_setup import bootstrap, stack_settings
from tenantflow_dev.processes import descendants, pid_alive
from tenantflow_dev.worker import LocalWorker

PROJECT = Path(__file__).resolve().parents[2]
FLOW = '''"""A flow that sleeps, for the zombie test."""
import time

from prefect import flow


@flow(name="tenantflow-zombie-test", persist_result=False)
def sleepy(seconds: float = 0.0) -> float:
    time.sleep(seconds)
    return seconds
'''
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
#: Prefect's floor for the flow-run heartbeat, and a window shorter than it (production
#: settings refuse that; the automation is made directly here): the test's run is killed
#: within seconds of its `Running` event, before its first beat is due, so only the kill
#: can leave the window without a beat, and the test waits a short window out, not a long
#: one.
HEARTBEAT_S = 30
ZOMBIE_AFTER_S = 12


# --------------------------------------------------------------------------- no stack


def test_fault_settings() -> None:
    settings = load_fault_settings()
    assert (settings.flow_heartbeat_s, settings.zombie_after_s) == (30, 90)
    assert settings.nightly_late_after_s == 26 * 3600
    secret = "https://alerts.example.test/hook?token=s3cr3t"
    with_url = load_fault_settings(alert_webhook_url=secret)
    assert secret not in repr(with_url)
    assert load_fault_settings(alert_webhook_url=" ").alert_webhook_url is None
    with pytest.raises(SettingsError, match="must exceed FLOW_HEARTBEAT_S"):
        load_fault_settings(flow_heartbeat_s=60, zombie_after_s=60)
    with pytest.raises(SettingsError, match="http") as refused:
        load_fault_settings(alert_webhook_url="ftp://user:s3cr3t@host/x")
    assert "s3cr3t" not in str(refused.value)
    with pytest.raises(SettingsError, match="FLOW_HEARTBEAT_S"):
        load_fault_settings(flow_heartbeat_s=10)  # Prefect sends one every 30 s at most


def test_automations_as_prefect_documents_them() -> None:
    zombie = zombie_automation(Alerts(zombie_after_s=90))
    trigger = zombie.trigger
    assert isinstance(trigger, EventTrigger)
    assert trigger.posture == Posture.Proactive
    assert trigger.after == {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.within == timedelta(seconds=90)
    (action,) = zombie.actions
    assert action.type == "change-flow-run-state"
    assert action.state == StateType.CRASHED

    block = uuid.uuid4()
    failed, late = alert_automations(Alerts(nightly_late_after_s=26 * 3600), block)
    assert failed.name == AUTOMATIONS["failed"]
    assert isinstance(failed.trigger, EventTrigger)
    assert failed.trigger.posture == Posture.Reactive
    assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert late.name == AUTOMATIONS["late"]
    assert isinstance(late.trigger, EventTrigger)
    assert late.trigger.posture == Posture.Proactive
    assert late.trigger.expect == {"prefect.flow-run.Completed"}
    assert late.trigger.within == timedelta(hours=26)
    for automation in (failed, late):
        (notify,) = automation.actions
        assert notify.type == "send-notification"
        assert notify.block_document_id == block
        assert "nightly-rollup" in notify.subject


# --------------------------------------------------------------------------- helpers


class Receiver:
    """An HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                received.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=t0k3n"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def matching(self, text: str) -> list[dict[str, Any]]:
        return [body for body in list(self.bodies) if text in json.dumps(body)]

    def wait_for(self, text: str, seconds: float) -> dict[str, Any]:
        """The first body that mentions `text` (blocking; run it in a thread)."""
        deadline = time.monotonic() + seconds
        while not (found := self.matching(text)):
            assert time.monotonic() < deadline, f"no notification naming {text!r}: {self.bodies}"
            time.sleep(0.5)
        return found[0]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


async def _bootstrap(stack: Stack, alerts: Alerts) -> BootstrapResult:
    settings = stack_settings(stack.config)
    return await abootstrap(
        concurrency_limit=settings.db_concurrency_limit,
        concurrency_slots=settings.db_concurrency_slots,
        flow_slots=settings.db_flow_slots,
        project_dir=PROJECT,
        api_url=stack.config.prefect_api_url,
        auth_string=stack.config.secrets.prefect_auth_string,
        alerts=alerts,
    )


@pytest.fixture
async def restore_automations(stack: Stack) -> AsyncIterator[None]:
    """Put the stack's own automations back (its settings: no alerts, a 90 s window)."""
    try:
        yield
    finally:
        result = await asyncio.to_thread(bootstrap, stack.config)
        assert not result.alerts
        async with get_client() as client:
            for role in ("failed", "late"):
                assert await client.read_automations_by_name(AUTOMATIONS[role]) == []


async def _wait_for(
    client: PrefectClient, run_id: UUID, states: set[StateType], seconds: float
) -> Any:
    async with asyncio.timeout(seconds):
        while True:
            run = await client.read_flow_run(run_id)
            if run.state_type in states:
                return run
            await asyncio.sleep(0.5)


def _with_heartbeat(pids: dict[int, int | None]) -> list[int]:
    """Those of `pids` whose environment sets the flow-run heartbeat to HEARTBEAT_S."""
    wanted = f"{HEARTBEAT_ENV}={HEARTBEAT_S}".encode()
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
    return found


@pytest.fixture
async def sleepy(stack: Stack, tmp_path: Path) -> AsyncIterator[tuple[str, UUID]]:
    """A pool of its own and a one-at-a-time deployment of the sleepy flow on it."""
    (tmp_path / "project" / "flows").mkdir(parents=True)
    (tmp_path / "project" / "flows" / "sleepy.py").write_text(FLOW)
    grant_traversal(tmp_path / "project" / "flows")
    pool = f"tenantflow-zombie-test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "project" / "prefect.yaml").write_text(
        f"deployments:\n  - name: {pool}\n    entrypoint: flows/sleepy.py:sleepy\n"
        f"    work_pool:\n      name: {pool}\n"
    )
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = await client.create_flow_from_name("tenantflow-zombie-test")
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=pool,
            entrypoint="flows/sleepy.py:sleepy",
            work_pool_name=pool,
            pull_steps=[{"tenantflow.deployments.set_project_directory": {}}],
            parameter_openapi_schema={
                "type": "object",
                "properties": {"seconds": {"type": "number", "default": 0.0}},
            },
            # As nightly-rollup: a zombie holding the deployment's one slot would hold back
            # every later run.
            concurrency_limit=1,
            concurrency_options=ConcurrencyOptions(collision_strategy="ENQUEUE"),
        )
    try:
        yield pool, deployment_id
    finally:
        async with get_client() as client:
            await client.delete_deployment(deployment_id)
            await client.delete_work_pool(pool)


def _kill_machine(pid: int) -> None:
    """SIGKILL the worker's process group and every process under it, at once."""
    doomed = descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for child in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in [pid, *doomed]):
        assert time.monotonic() < deadline, "the killed processes are still alive"
        time.sleep(0.1)


# --------------------------------------------------------------------------- zombies


async def crash_a_killed_run(stack: Stack, tmp_path: Path, sleepy: tuple[str, UUID]) -> str:
    """SIGKILL a worker with its running flow run, as a dying machine; the zombie automation
    must mark the run Crashed, and a later run of the one-at-a-time deployment must not be
    held behind it. Returns what was seen, for the log.

    Also run by the faults of the several-server topology (`tests/faults/test_ha.py`).
    """
    pool, deployment_id = sleepy
    result = await _bootstrap(stack, Alerts(zombie_after_s=ZOMBIE_AFTER_S))
    assert result.automations[AUTOMATIONS["zombie"]] in {"created", "updated"}
    assert "alerts: off" in result.summary()
    config = dataclasses.replace(stack.config, project_dir=tmp_path / "project")
    worker = LocalWorker(
        config, pool=pool, worker_name=f"{pool}-worker", root=tmp_path / "worker", drain_seconds=2
    )
    assert worker.environment()["FLOW_HEARTBEAT_S"] == str(HEARTBEAT_S)
    try:
        assert await asyncio.to_thread(worker.start)
        async with get_client() as client:
            slow = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"seconds": 600}
            )
            await _wait_for(client, slow.id, {StateType.RUNNING}, 120)
            pid = worker.pid()
            assert pid is not None
            run_pids = _with_heartbeat(descendants(pid))
            assert run_pids, "the flow-run process has the heartbeat in its environment"

            killed = time.monotonic()
            await asyncio.to_thread(_kill_machine, pid)
            still = await client.read_flow_run(slow.id)
            assert still.state_type == StateType.RUNNING, "nobody is left to report the death"

            crashed = await _wait_for(client, slow.id, TERMINAL, ZOMBIE_AFTER_S + 60)
            crashed_after = time.monotonic() - killed
            assert crashed.state_type == StateType.CRASHED, crashed.state
            assert crashed.state is not None
            assert f"No heartbeat from this flow run for {ZOMBIE_AFTER_S}s" in (
                crashed.state.message or ""
            )

            # A later run of the same one-at-a-time deployment is not held behind the zombie.
            later = await client.create_flow_run_from_deployment(
                deployment_id, parameters={"seconds": 0}
            )
            restarted = time.monotonic()
            assert await asyncio.to_thread(worker.start)
            done = await _wait_for(client, later.id, TERMINAL, 120)
            assert done.state_type == StateType.COMPLETED, done.state
            later_seconds = time.monotonic() - restarted
    finally:
        await asyncio.to_thread(worker.stop)
    return (
        f"zombie: Crashed {crashed_after:.1f}s after the kill (window "
        f"{ZOMBIE_AFTER_S}s, heartbeat {HEARTBEAT_S}s); the next run Completed "
        f"{later_seconds:.1f}s after the worker restarted"
    )


@pytest.mark.stack
@pytest.mark.slow
async def test_a_killed_run_is_crashed_by_its_missing_heartbeats(
    stack: Stack,
    tmp_path: Path,
    sleepy: tuple[str, UUID],
    restore_automations: None,
) -> None:
    seen = await crash_a_killed_run(stack, tmp_path, sleepy)
    sys.stderr.write(f"\n{seen}\n")


# --------------------------------------------------------------------------- alerts


@pytest.mark.stack
@pytest.mark.slow
async def test_operators_hear_of_a_failed_nightly_rollup(
    stack: Stack, receiver: Receiver, restore_automations: None
) -> None:
    alerts = Alerts(webhook_url=receiver.url)
    first = await _bootstrap(stack, alerts)
    assert first.alerts and "alerts: off" not in first.summary()
    assert receiver.url not in first.summary()
    again = await _bootstrap(stack, alerts)
    assert set(again.automations.values()) == {"unchanged"}, again.automations
    async with get_client() as client:
        late = (await client.read_automations_by_name(AUTOMATIONS["late"]))[0]
        assert isinstance(late.trigger, EventTrigger)
        assert late.trigger.posture == Posture.Proactive
        assert late.trigger.within == timedelta(hours=26)
        # The block keeps the URL (and its token) as a secret.
        block = await client.read_block_document_by_name(
            "tenantflow-alerts", "custom-webhook", include_secrets=False
        )
        assert "t0k3n" not in json.dumps(block.data, default=str)

        # A member (not an operator) starts nightly-rollup by hand: the guard refuses it.
        token = await sealed_token(
            stack.config, DEMO_MEMBER, flow="nightly-rollup", client_ids=None
        )
        deployment = await client.read_deployment_by_name("nightly-rollup/nightly-rollup")
        started = time.monotonic()
        run = await client.create_flow_run_from_deployment(
            deployment.id, parameters={"access_token": token}
        )
        failed = await _wait_for(client, run.id, TERMINAL, 120)
        assert failed.state_type == StateType.FAILED, failed.state

    body = await asyncio.to_thread(receiver.wait_for, run.name, 60)
    notified = time.monotonic() - started
    await asyncio.sleep(5)
    assert len(receiver.matching(run.name)) == 1, receiver.bodies
    assert "Failed" in body["subject"] and "nightly-rollup" in body["subject"]
    assert "Failed" in body["body"]
    assert str(run.id) in body["body"]
    assert (failed.state.message or "")[:40] in body["body"]
    assert token not in json.dumps(body)
    sys.stderr.write(f"\nnotification {notified:.1f}s after the run was created: {body}\n")


@pytest.mark.stack
@pytest.mark.slow
async def test_operators_hear_of_a_late_nightly_rollup(
    stack: Stack, receiver: Receiver, restore_automations: None
) -> None:
    """The late/missing trigger fires when its window passes without a Completed run.

    26 hours cannot be waited for; a 15 s window shows the automation works as built.
    """
    started = time.monotonic()
    await _bootstrap(stack, Alerts(webhook_url=receiver.url, nightly_late_after_s=15))
    body = await asyncio.to_thread(receiver.wait_for, "late or missing", 90)
    sys.stderr.write(
        f"\nlate notification {time.monotonic() - started:.1f}s after the bootstrap: {body}\n"
    )
    assert "in the last 15s" in body["body"]
