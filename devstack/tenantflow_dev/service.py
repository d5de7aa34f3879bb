"""What every part of the local stack is (`Service`), and the base of our own servers.

`HttpProcessService` is one process group of ours, started detached with its log and pid
files in the stack folder, healthy when it answers (HTTP, mostly): the Prefect server
processes, the Supabase Auth stand-in, Redis and HAProxy are some of them.
"""

from __future__ import annotations

import os
from typing import Protocol

from tenantflow_dev.config import StackConfig
from tenantflow_dev.errors import StackError
from tenantflow_dev.health import Health
from tenantflow_dev.processes import (
    pid_alive,
    port_is_open,
    read_pid,
    spawn_detached,
    stop_process_group,
    wait_until_ready,
)

__all__ = ["HttpProcessService", "Service", "require_free_port"]


class Service(Protocol):
    """A long-running part of the stack, as `Stack` starts, stops and reports it."""

    name: str

    def start(self) -> bool:
        """Start if not running; return False when it was already running."""

    def stop(self) -> bool:
        """Stop if running; return False when it was not running."""

    def health(self) -> Health: ...


def require_free_port(host: str, port: int, name: str, variable: str) -> None:
    """StackError if another program listens on `port` (named by its `variable`)."""
    if port_is_open(host, port):
        raise StackError(
            f"{name}: port {port} on {host} is already taken by another program; "
            f"stop it or choose another port with {variable}"
        )


class HttpProcessService:
    """A stack service that is one process group of ours, healthy when it answers HTTP.

    Subclasses say how to start it (`argv`, `environment`, `prepare`) and how to ask it
    (`answers`); starting, waiting, stopping and reporting live here once.
    """

    name: str
    what: str
    folder: str
    #: The setting that moves its port ("" for a process that listens on none).
    port_variable: str
    ready_timeout: float = 30
    stop_grace: float = 10
    #: umask of the process (None: inherit ours).
    umask: int | None = None

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.root = config.stack_dir / self.folder
        self.pidfile = self.root / "server.pid"
        self.logfile = self.root / "server.log"

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def address(self) -> str:
        raise NotImplementedError

    def argv(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def answers(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Work before the process starts (folders, keys, schemas)."""
        self.root.mkdir(parents=True, exist_ok=True)

    def pid(self) -> int | None:
        pid = read_pid(self.pidfile)
        return pid if pid_alive(pid) else None

    def start(self) -> bool:
        if self.pid() is not None:
            return False
        if self.port_variable:
            require_free_port(self.config.host, self.port, self.name, self.port_variable)
        self.prepare()
        umask = self.umask
        process = spawn_detached(
            self.argv(),
            cwd=self.root,
            env=self.environment(),
            logfile=self.logfile,
            pidfile=self.pidfile,
            preexec_fn=None if umask is None else lambda: _set_umask(umask),
        )
        wait_until_ready(
            process, self.answers, timeout=self.ready_timeout, what=self.what, logfile=self.logfile
        )
        return True

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        stop_process_group(pid, grace=self.stop_grace, what=self.what)
        self.pidfile.unlink(missing_ok=True)
        return True

    def health(self) -> Health:
        pid = self.pid()
        healthy = pid is not None and self.answers()
        detail = "ok" if healthy else ("not answering" if pid else "not running")
        return Health(self.name, self.address, pid is not None, healthy, pid, detail)


def _set_umask(mask: int) -> None:
    os.umask(mask)
