"""OS processes of the local stack: liveness, pid files, spawning, waiting, stopping.

Nothing here knows which service a process is; the services (`postgres`, `pgbouncer`,
`service`, `worker`) build on these helpers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tenantflow_dev.errors import StackError

__all__ = [
    "descendants",
    "kill_leftovers",
    "pid_alive",
    "port_is_open",
    "read_pid",
    "run_checked",
    "spawn_detached",
    "start_time",
    "stop_process_group",
    "wait_for",
    "wait_until_ready",
]

log = logging.getLogger("tenantflow_dev")


def port_is_open(host: str, port: int, timeout: float = 0.3) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` every 0.1 s until it holds; StackError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # NOTE: a zombie still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def run_checked(argv: list[str], what: str) -> None:
    """Run a command to completion; StackError with the end of its output if it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise StackError(f"{what} failed (exit {result.returncode}): {output}")


def spawn_detached(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    logfile: Path,
    pidfile: Path,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own session, output to `logfile`, pid recorded.

    Both files are the starting user's only (0600).
    """
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as log_handle:
        process = subprocess.Popen(  # noqa: S603
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
    fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as pid_handle:
        pid_handle.write(str(process.pid))
    return process


def wait_until_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    logfile: Path,
) -> None:
    """Wait for `ready()`, failing at once (pointing at the log) if the process exits."""

    def check() -> bool:
        if process.poll() is not None:
            raise StackError(f"{what} exited with {process.returncode}; see {logfile}")
        return ready()

    wait_for(check, timeout, f"{what} to answer")


def stop_process_group(pid: int, *, grace: float, what: str) -> None:
    """SIGTERM the process group; SIGKILL it if `pid` has not exited after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not pid_alive(pid), grace, f"{what} to exit")
    except StackError:
        log.warning("%s did not exit within %.0fs; killing it", what, grace)
    # NOTE: children (uvicorn, services) share the group; none may outlive the leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 5, f"{what} to be killed")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a pid from a reused one)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])


def descendants(root: int) -> dict[int, int | None]:
    """Every live descendant of `root`, pid -> start time."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, int | None] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = start_time(pid)
            stack.extend(children.get(pid, []))
    return found


def kill_leftovers(processes: dict[int, int | None]) -> list[int]:
    """SIGKILL the processes of `processes` that are still the same processes."""
    killed = []
    for pid, started in processes.items():
        if pid_alive(pid) and start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed
