"""A Docker API for the docker pool: podman's (`podman system service`), on a socket of ours.

Prefect's docker worker (and so the tenantflow docker worker) talks to a Docker engine
through docker-py (`DOCKER_HOST`). Here podman serves that API, with the dev stack's own
podman storage and containers.conf (`Podman.argv`), so its containers are the ones
`Podman.run("ps")` sees and the worker image is the one `tenantflow-dev image` built.

`DockerApi(podman, folder)` serves `unix://<folder>/podman.sock` until `stop()`
(`--time=0`: it never exits for being idle); its log is `<folder>/podman-service.log`.
`environment()` gives what a worker needs to reach it (`DOCKER_HOST`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

from tenantflow_dev.errors import StackError
from tenantflow_dev.podman import Podman

__all__ = ["DockerApi"]


class DockerApi:
    """podman's Docker-compatible API on a unix socket, started and stopped by us."""

    def __init__(self, podman: Podman, folder: Path) -> None:
        self.podman = podman
        self.folder = folder
        self.socket = folder / "podman.sock"
        self.logfile = folder / "podman-service.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def environment(self) -> dict[str, str]:
        """What a docker worker needs to reach this API."""
        return {"DOCKER_HOST": self.docker_host}

    def answers(self) -> bool:
        """Whether the API answers `GET /_ping` with OK."""
        if not self.socket.exists():
            return False
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket))) as client:
                return client.get("http://podman/_ping", timeout=2).text.strip() == "OK"
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = 30) -> None:
        """Serve the API and wait until it answers.

        Raises:
            StackError: podman exited, or the API did not answer within `timeout`.
        """
        if self._process is not None and self._process.poll() is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket.unlink(missing_ok=True)
        with self.logfile.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 (podman with our own arguments)
                self.podman.argv("system", "service", "--time=0", self.docker_host),
                env=self.podman.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise StackError(
                    f"podman system service exited ({self._process.returncode}): see {self.logfile}"
                )
            if self.answers():
                return
            time.sleep(0.1)
        self.stop()
        raise StackError(
            f"podman's Docker API did not answer in {timeout:.0f}s: see {self.logfile}"
        )

    def stop(self, grace: float = 10) -> None:
        """Stop serving (SIGTERM to podman's process group, SIGKILL after `grace`)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(grace)
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> DockerApi:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
