"""The worker image, built by the tests themselves through `make image`'s own code.

`worker_image` builds it once per session with `tenantflow_dev.image.build_image` (cached
outside the clone: a warm run finds every step cached and takes about a second). Missing
podman or debootstrap fails the tests in one line saying what to install: they are never
skipped (`make test` installs both).

`worker_container` runs containers of it as users run them: `--network host` (the stack
listens on 127.0.0.1), the worker's settings in an env file of its own (never a value on
the command line), the image's own command or `tenantflow worker`, so the worker is PID 1.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tenantflow_dev import Stack
from tenantflow_dev.image import BuiltImage, build_image
from tenantflow_dev.podman import Podman
from tenantflow_dev.worker import LocalWorker
from tenantflow_dev.worker_container import tenant_worker_settings, write_settings_file

PROJECT = Path(__file__).resolve().parents[2]

#: The line Prefect's worker prints once it polls its pool.
STARTED = "started!"


@dataclass
class Container:
    """One container of the worker image, removed when the test ends."""

    podman: Podman
    name: str
    settings_file: Path
    started_at: float = field(default_factory=time.monotonic)

    def logs(self) -> str:
        return self.podman.logs(self.name)

    def running(self) -> bool:
        return self.podman.container_running(self.name)

    def wait_for_line(self, text: str, timeout: float = 120) -> str:
        """The container's log once it holds `text`; AssertionError with the log's end if
        the container exits first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = self.logs()
            if text in logs:
                return logs
            if not self.running() and text not in (logs := self.logs()):
                raise AssertionError(f"{self.name} exited before {text!r}:\n{logs[-2000:]}")
            time.sleep(0.2)
        raise AssertionError(
            f"no {text!r} from {self.name} in {timeout:.0f}s:\n{self.logs()[-2000:]}"
        )

    def wait_exit(self, timeout: float = 120) -> int:
        """The container's exit code, once it has exited (AssertionError after `timeout`)."""
        done = self.podman.run("wait", self.name, timeout=timeout, check=False)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().splitlines()[-1])

    def stop(self, seconds: int = 60) -> None:
        """`podman stop`: SIGTERM to PID 1, SIGKILL after `seconds`."""
        self.podman.run("stop", "--time", str(seconds), self.name, timeout=seconds + 30)


@pytest.fixture(scope="session")
def worker_image() -> BuiltImage:
    return build_image(PROJECT)


@pytest.fixture(scope="session")
def podman(worker_image: BuiltImage) -> Podman:
    return Podman.from_env()


@pytest.fixture
def worker_container(
    podman: Podman, worker_image: BuiltImage, stack: Stack, tmp_path: Path
) -> Iterator[Callable[..., Container]]:
    """`start(settings, *command)`: a container of the image with `settings` (default: a
    tenant worker's) in an env file, and `command` (default: the image's own)."""
    made: list[Container] = []

    def start(settings: dict[str, str] | None = None, *command: str) -> Container:
        name = f"tenantflow-image-test-{uuid.uuid4().hex[:8]}"
        settings_file = write_settings_file(
            tmp_path / f"{name}.env",
            tenant_worker_settings(stack.config) if settings is None else settings,
        )
        container = Container(podman, name, settings_file)
        made.append(container)
        podman.run_detached(
            worker_image.reference, name=name, env_file=settings_file, command=command
        )
        return container

    yield start
    for container in made:
        podman.remove(container.name, stop_seconds=5)


@pytest.fixture
def without_stack_worker(stack: Stack) -> Iterator[None]:
    """The stack's own process worker stopped for the test (every worker of a pool takes
    any of its runs: while it polls, nothing proves the container ran a run), started
    again afterwards."""
    worker = LocalWorker(stack.config)
    worker.stop()
    try:
        yield
    finally:
        worker.start()
