"""`make test`: the whole suite as two pytest processes at once, each on a stack of its own.

Part of the suite waits rather than computes: for a flow run's process to start, for a
heartbeat window to pass, for a restarted part to answer. Two streams overlap those
waits with the other stream's work. The second stream takes the tests that stop,
restart or reconfigure parts of their stack or wait out windows (`SECOND`); every other
test, and any file added later, runs in the first stream, on the project's own stack
(`.stack`, the developer's ports).

    python -m tests.streams [pytest options]   # both streams; exit status 0 only if both pass
    python -m tests.streams down               # stop the second stream's stack

The second stack lives in `.stack-second` on ports below the kernel's ephemeral range
(`SECOND_STACK`), so no outgoing connection of the first stream can hold one of them
while a test restarts the part that listens there. Its Prefect runs as several servers
(the `ha` topology: Redis, two API replicas behind HAProxy, the services in a process of
their own), so its faults (`tests/faults/test_ha.py`) have replicas and a Redis to kill,
and the rest of the second stream runs on that topology too; the first stream's stack
keeps the default, one server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

PROJECT = Path(__file__).resolve().parents[1]

#: Lines of a failed stream's output repeated at the end when pytest printed no summary.
TAIL = 40

#: Run by the second stream: faults, alerts and the stack's own lifecycle (they restart,
#: stop or reconfigure parts of their stack; the worker containers' tests stop its worker
#: and kill a container, on the several-server topology), and other long waits (the
#: operator's commands as subprocesses, each run followed to its end).
SECOND = (
    "tests/deployments/test_alerts.py",
    "tests/deployments/test_dockerfile.py",
    "tests/devstack",
    "tests/e2e/test_operator_ui.py",
    "tests/faults",
    "tests/image/test_worker_containers.py",
    "tests/operators/test_grants.py",
    "tests/operators/test_operator_path.py",
    "tests/operators/test_otp.py",
    "tests/operators/test_session.py",
    "tests/operators/test_token.py",
    "tests/test_cli_errors.py",
)

#: The second stack's folder and ports (TENANTFLOW_* as `StackConfig.from_env` reads them).
SECOND_STACK = {
    "TENANTFLOW_STACK_DIR": str(PROJECT / ".stack-second"),
    "TENANTFLOW_PG_PORT": "15432",
    "TENANTFLOW_TRANSACTION_POOLER_PORT": "16543",
    "TENANTFLOW_SESSION_POOLER_PORT": "15433",
    "TENANTFLOW_AUTH_PORT": "15434",
    "TENANTFLOW_PREFECT_PORT": "14200",
    "TENANTFLOW_PREFECT_TOPOLOGY": "ha",
    "TENANTFLOW_PREFECT_REPLICA_PORTS": "14201,14202",
    "TENANTFLOW_REDIS_PORT": "14210",
}


def _relay(name: str, stream: IO[str], lock: threading.Lock, kept: list[str]) -> None:
    for line in stream:
        kept.append(line)
        with lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()


def _summary(lines: list[str]) -> list[str]:
    """The end of a failed stream's output, from pytest's short summary on (the last
    `TAIL` lines if it printed none): what failed, repeated where a reader of the log's
    end sees it, whichever stream finished last."""
    for index in range(len(lines) - 1, -1, -1):
        if "short test summary info" in lines[index]:
            return lines[index:]
    return lines[-TAIL:]


def _second_environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(SECOND_STACK)
    env["TENANTFLOW_PROJECT_DIR"] = str(PROJECT)
    return env


def down() -> int:
    """Stop the second stream's stack (what `make down` calls)."""
    if not Path(SECOND_STACK["TENANTFLOW_STACK_DIR"]).exists():
        return 0
    return subprocess.call(
        [sys.executable, "-m", "tenantflow_dev.cli", "down"], env=_second_environment()
    )


def main(options: list[str]) -> int:
    if options == ["down"]:
        return down()
    base = Path(tempfile.mkdtemp(prefix="tenantflow-tests-"))
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    ignored = [f"--ignore={path}" for path in SECOND]
    streams = {
        "first": ([*pytest, *ignored, f"--basetemp={base / 'first'}", *options], None),
        "second": (
            [*pytest, *SECOND, f"--basetemp={base / 'second'}", *options],
            _second_environment(),
        ),
    }
    lock = threading.Lock()
    started = time.monotonic()
    running: dict[str, subprocess.Popen[str]] = {}
    relays = []
    output: dict[str, list[str]] = {name: [] for name in streams}
    for name, (argv, env) in streams.items():
        process = subprocess.Popen(
            argv,
            cwd=PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        running[name] = process
        assert process.stdout is not None
        relay = threading.Thread(
            target=_relay, args=(name, process.stdout, lock, output[name]), daemon=True
        )
        relay.start()
        relays.append(relay)
    try:
        codes = {name: process.wait() for name, process in running.items()}
    except KeyboardInterrupt:
        for process in running.values():
            # NOTE: SIGINT, as a terminal's Ctrl-C would send: pytest stops and its session
            # fixtures take down the stacks they started.
            os.killpg(process.pid, signal.SIGINT)
        codes = {name: process.wait() for name, process in running.items()}
    for relay in relays:
        relay.join(timeout=10)
    shutil.rmtree(base, ignore_errors=True)
    seconds = time.monotonic() - started
    for name, code in codes.items():
        if code != 0:
            sys.stdout.write(f"tests: the {name} stream failed; its summary again:\n")
            sys.stdout.writelines(f"[{name}] {line}" for line in _summary(output[name]))
    verdicts = (f"{name} {'passed' if code == 0 else 'FAILED'}" for name, code in codes.items())
    sys.stdout.write(f"tests: {', '.join(verdicts)} in {seconds:.0f}s (two streams at once)\n")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
