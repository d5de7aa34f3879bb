"""The local stack's process workers: `tenantflow worker` as supervised stack services.

* `LocalWorker` — `tenantflow worker --pool POOL` (Prefect's process worker, running only
  the code the project declares: `tenantflow.worker`) as a stack service: a child process
  in its own session, log and pid files in the stack folder. The stack runs two, as
  production should (docs/operations.md): `prefect-worker` on `tenantflow-process` for the
  tenant deployments, and `migrate-worker` on `tenantflow-migrate` for `migrate` alone.
  Only the latter holds the schema owner's login (MIGRATION_DATABASE_URL); each gets an
  allow-listed environment, not the caller's. Started by root, they run as the
  unprivileged OS users `tenantflow` and `tenantflow-migrate`, which can read the project
  and the venv but not the stack's secrets file, `.env`, nor the Prefect server's folder.

Its Prefect set-up (the pool it serves, the deployments) is `tenantflow_dev.prefect_setup`.

NOTE: a worker without PREFECT_API_URL silently starts a temporary server
of its own, so the worker always gets the stack's URL. Its default poll interval (10 s)
dominates a local run's latency, so it polls every 2 s. A worker that is stopped kills
the flow runs it is executing and leaves them Running (or Submitting) for ever, so
`stop()` first lets the worker's runs finish for a while, then stops it with one SIGTERM
(Prefect turns it into a graceful SIGINT; a second signal would SIGKILL it), and finally
marks Crashed every in-flight run of the pool that it took and whose process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tenantflow.deployments import MIGRATE_POOL, WORK_POOLS
from tenantflow.flow_environment import MIGRATION_ENV, flow_run_environment
from tenantflow.project import PROJECT_DIR_ENV
from tenantflow_dev.config import MIGRATE_WORKER_USER, WORKER_USER, StackConfig
from tenantflow_dev.errors import StackError
from tenantflow_dev.health import Health
from tenantflow_dev.os_users import grant_traversal, worker_user_ids
from tenantflow_dev.prefect_setup import bootstrap
from tenantflow_dev.processes import (
    descendants,
    kill_leftovers,
    pid_alive,
    read_pid,
    spawn_detached,
    wait_for,
)

__all__ = [
    "MIGRATE_WORKER_NAME",
    "WORKER_NAME",
    "LocalWorker",
    "heartbeat_time",
    "worker_registration",
]

log = logging.getLogger("tenantflow_dev")

WORKER_NAME = "tenantflow-local"
MIGRATE_WORKER_NAME = "tenantflow-local-migrate"
_IN_FLIGHT = ["PENDING", "RUNNING", "CANCELLING"]


def _default_sigint() -> None:
    # NOTE: a process started from a non-interactive shell's background job inherits
    # SIGINT ignored, and then Python installs no KeyboardInterrupt handler: the worker
    # would ignore the SIGINT that Prefect turns SIGTERM into. Restore the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _drop_to(uid: int, gid: int) -> None:
    """In the worker's child, before exec: become the worker's OS user for good."""
    _default_sigint()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.umask(0o077)


# --------------------------------------------------------------------------- service


class LocalWorker:
    """`prefect worker start` on a process work pool, as a service of the local stack.

    On `tenantflow-migrate` (`LocalWorker.for_migrate`) it is the migrate worker: its own
    name, folder and OS user, and the only one given MIGRATION_DATABASE_URL.

    Healthy means: the process is alive *and* the Prefect server lists a worker of this
    name on the pool, online, whose last heartbeat is recent.
    """

    def __init__(
        self,
        config: StackConfig,
        *,
        pool: str = WORK_POOLS["process"],
        worker_name: str | None = None,
        root: Path | None = None,
        drain_seconds: float | None = None,
        limit: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.limit = limit
        #: Settings of this worker's own, over the stack's (a test's, a benchmark's).
        self.settings = dict(settings or {})
        #: Whether it serves `migrate` and so holds the schema owner's login.
        self.migrate = pool == MIGRATE_POOL
        self.name = "migrate-worker" if self.migrate else "prefect-worker"
        self.os_user = MIGRATE_WORKER_USER if self.migrate else WORKER_USER
        self.worker_name = worker_name or (MIGRATE_WORKER_NAME if self.migrate else WORKER_NAME)
        self.root = root or config.stack_dir / ("migrate-worker" if self.migrate else "worker")
        self.pidfile = self.root / "worker.pid"
        self.logfile = self.root / "worker.log"
        self.drain_seconds = (
            drain_seconds
            if drain_seconds is not None
            else float(os.environ.get("TENANTFLOW_WORKER_DRAIN_SECONDS", "30"))
        )

    @classmethod
    def for_migrate(cls, config: StackConfig) -> LocalWorker:
        """The stack's migrate worker: pool `tenantflow-migrate`, the owner's login."""
        return cls(config, pool=MIGRATE_POOL)

    @property
    def address(self) -> str:
        return f"pool {self.pool}"

    @property
    def api_url(self) -> str:
        return self.config.prefect_api_url

    def pid(self) -> int | None:
        pid = read_pid(self.pidfile)
        return pid if pid_alive(pid) else None

    @property
    def home(self) -> Path:
        """The worker's PREFECT_HOME and HOME: the worker's OS user's own."""
        return self.root / "home"

    def environment(self) -> dict[str, str]:
        """The worker process's whole environment: what it and its flow runs need.

        Of this process's environment only what a flow run may get at all (basics, Prefect's
        client settings, tenantflow's settings: `tenantflow.flow_environment`),
        then the stack's settings; MIGRATION_DATABASE_URL for the migrate worker only.
        """
        env = flow_run_environment({}, os.environ, migration=self.migrate)
        env.update(self.config.environment())
        if not self.migrate:
            env.pop(MIGRATION_ENV, None)
        # NOTE: Prefect's own poll (every 10 s), as in production: the worker starts a run
        # as soon as Prefect's events announce it (tenantflow.wake), the poll is the net.
        env.update(
            {
                "PREFECT_API_URL": self.api_url,
                "PREFECT_HOME": str(self.home),
                "PREFECT_LOGGING_LEVEL": "INFO",
                # NOTE: the worker passes it on to every flow run as
                # PREFECT_FLOWS_HEARTBEAT_FREQUENCY (the zombie automation's input).
                "FLOW_HEARTBEAT_S": os.environ.get("FLOW_HEARTBEAT_S", "30"),
                # NOTE: where the worker reads prefect.yaml and its flows.
                PROJECT_DIR_ENV: str(self.config.project_dir),
                "PYTHONUNBUFFERED": "1",
                **self.settings,
            }
        )
        return env

    def command(self) -> list[str]:
        """The worker's command line: `tenantflow worker` on the pool."""
        return [
            sys.executable,
            "-m",
            "tenantflow.cli",
            "worker",
            "--pool",
            self.pool,
            "--name",
            self.worker_name,
            *(["--limit", str(self.limit)] if self.limit else []),
        ]

    def start(self) -> bool:
        if self.pid() is not None:
            return False
        if self.pool in (WORK_POOLS["process"], MIGRATE_POOL):
            # NOTE: the worker is started with --no-create-pool-if-not-found, so a typo
            # never creates a stray pool with Prefect's default template.
            bootstrap(self.config)
        ids = self._prepare_folders()
        # NOTE: runs left Running by a worker that died (a reboot, a kill -9) would block
        # their deployment's concurrency slot for ever; settle them before serving again.
        if crashed := self._crash_orphaned_runs():
            log.warning("marked %d flow run(s) of a previous worker Crashed", crashed)
        started_at = datetime.now(UTC)
        argv = self.command()
        env = self.environment()
        if ids is not None:
            env.update({"HOME": str(self.home), "USER": self.os_user, "LOGNAME": self.os_user})
        process = spawn_detached(
            argv,
            cwd=self.root,
            env=env,
            logfile=self.logfile,
            pidfile=self.pidfile,
            preexec_fn=_default_sigint if ids is None else lambda: _drop_to(*ids),
        )

        def registered() -> bool:
            if process.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                raise StackError(
                    f"the Prefect worker exited with {process.returncode}; see {self.logfile}"
                )
            try:
                worker = self._registration()
            except httpx.HTTPError:
                return False
            return worker is not None and heartbeat_time(worker) >= started_at

        try:
            wait_for(registered, 120, f"the worker to register with work pool {self.pool}")
        except StackError:
            self.stop()
            raise
        return True

    def _prepare_folders(self) -> tuple[int, int] | None:
        """The worker's folders; as root, the worker's OS user ids (None otherwise).

        As root: the worker's OS user may traverse to the project folder (flows/, read by
        every flow run) and to the interpreter's venv, and owns its home (PREFECT_HOME).
        It cannot read the project's `.env` (`Stack.write_env_file`): its settings come
        from its environment alone.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        ids = worker_user_ids(self.os_user)
        if ids is None:
            return None
        self.root.chmod(0o711)
        os.chown(self.home, *ids)
        self.home.chmod(0o700)
        # NOTE: the venv's interpreter may be a link into a private folder (pyenv under
        # /root): the real interpreter and its standard library must be reachable too.
        for path in (
            self.root,
            self.config.project_dir / "flows",
            Path(sys.prefix) / "bin" / "python",
            Path(os.path.realpath(sys.executable)),
            Path(sys.base_prefix) / "lib" / "python",
        ):
            grant_traversal(path)
        return ids

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        seen = descendants(pid)
        self._drain(pid, seen)
        seen.update(descendants(pid))
        # NOTE: one signal only: Prefect answers a second SIGTERM with SIGKILL.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: not pid_alive(pid), 30, "the worker to exit")
        except StackError:
            log.warning("the worker did not exit within 30s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(pid), 5, "the worker to be killed")
        killed = kill_leftovers(seen)
        if killed:
            log.warning("killed %d flow-run process(es) left by the worker", len(killed))
        self.pidfile.unlink(missing_ok=True)
        crashed = self._crash_orphaned_runs()
        if crashed:
            log.warning("marked %d flow run(s) Crashed: the worker stopped while they ran", crashed)
        return True

    def health(self) -> Health:
        pid = self.pid()
        if pid is None:
            return Health(self.name, self.address, False, False, None, "not running")
        try:
            worker = self._registration()
        except httpx.HTTPError:
            return Health(self.name, self.address, True, False, pid, "Prefect API not answering")
        if worker is None:
            return Health(self.name, self.address, True, False, pid, "not registered")
        age = (datetime.now(UTC) - heartbeat_time(worker)).total_seconds()
        interval = float(worker.get("heartbeat_interval_seconds") or 30)
        healthy = worker.get("status") == "ONLINE" and age < 3 * interval
        detail = f"{str(worker.get('status', '?')).lower()}, heartbeat {age:.0f}s ago"
        return Health(self.name, self.address, True, healthy, pid, detail)

    # ----------------------------------------------------------------------- API

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(
            f"{self.api_url}{path}",
            json=body,
            headers=self.config.prefect_api_headers(),
            timeout=5,
        )
        response.raise_for_status()
        return response.json()

    def _registration(self) -> dict[str, Any] | None:
        """This worker's record on the pool, or None."""
        return worker_registration(self.config, self.pool, self.worker_name)

    def _in_flight_runs(self) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self._post(
            "/flow_runs/filter",
            {
                "work_pools": {"name": {"any_": [self.pool]}},
                "flow_runs": {"state": {"type": {"any_": _IN_FLIGHT}}},
                "limit": 200,
            },
        )
        return runs

    def _drain(self, pid: int, seen: dict[int, int | None]) -> None:
        """Wait (at most `drain_seconds`) for the runs this worker is executing."""
        deadline = time.monotonic() + self.drain_seconds
        announced = False
        while time.monotonic() < deadline:
            live = descendants(pid)
            seen.update(live)
            try:
                ours = [r for r in self._in_flight_runs() if _run_pid(r) in live]
            except httpx.HTTPError:
                return
            if not ours:
                return
            if not announced:
                log.info(
                    "waiting up to %.0fs for %d flow run(s) of the worker to finish",
                    self.drain_seconds,
                    len(ours),
                )
                announced = True
            time.sleep(0.5)

    def _crash_orphaned_runs(self) -> int:
        """Mark Crashed the in-flight runs of the pool whose process no longer exists.

        NOTE: only runs with a process id (the process worker records it when it starts
        the run); such a run whose process is gone can never finish on its own and, with a
        deployment concurrency limit, would block every later run of its deployment.
        """
        try:
            runs = self._in_flight_runs()
        except httpx.HTTPError:
            return 0
        crashed = 0
        for run in runs:
            run_pid = _run_pid(run)
            # NOTE: another worker's run (a worker container's pid is not one of this
            # machine's) is that worker's to settle.
            taken_by = (run.get("labels") or {}).get("prefect.worker.name", self.worker_name)
            if run_pid is None or taken_by != self.worker_name or pid_alive(run_pid):
                continue
            state = {
                "type": "CRASHED",
                "name": "Crashed",
                "message": (
                    "The local stack's worker stopped while this flow run was in progress "
                    "(tenantflow-dev down, or the worker died); start the run again."
                ),
            }
            try:
                result = self._post(
                    f"/flow_runs/{run['id']}/set_state", {"state": state, "force": False}
                )
            except httpx.HTTPError:
                continue
            if result.get("status") == "ACCEPT":
                crashed += 1
        return crashed


def worker_registration(config: StackConfig, pool: str, name: str) -> dict[str, Any] | None:
    """The record of the worker `name` on `pool` of the stack's Prefect server, or None."""
    response = httpx.post(
        f"{config.prefect_api_url}/work_pools/{pool}/workers/filter",
        json={"limit": 200},
        headers=config.prefect_api_headers(),
        timeout=5,
    )
    if response.status_code == 404:
        return None
    response.raise_for_status()
    for worker in response.json():
        if worker.get("name") == name:
            found: dict[str, Any] = worker
            return found
    return None


def heartbeat_time(worker: dict[str, Any]) -> datetime:
    """When a worker's record (`worker_registration`) was last refreshed."""
    value = worker.get("last_heartbeat_time")
    if not value:
        return datetime.min.replace(tzinfo=UTC)
    moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _run_pid(run: dict[str, Any]) -> int | None:
    value = str(run.get("infrastructure_pid") or "").rsplit(":", 1)[-1]
    return int(value) if value.isdigit() else None
