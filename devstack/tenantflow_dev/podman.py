"""Podman as the dev stack runs it: the one module that knows how podman is called here.

Every podman command of the dev stack, its tests and its benchmarks goes through `Podman`:
`Podman.from_env().run("run", "--rm", IMAGE, ...)`. Each call gets

* a storage of its own (`--root`, `--runroot`, `--tmpdir`), never the machine's
  `/var/lib/containers`, so nothing here touches (or is touched by) another podman user;
* a `containers.conf` of its own (`CONTAINERS_CONF`, which replaces every system and user
  file): `runc`, not `crun` (crun fails here to set `RLIMIT_NOFILE` and on cgroups in hybrid
  mode), ulimits a worker's Prefect client and Python are happy with, cgroupfs and a file
  event log (no systemd on these machines);
* everything it stores kept outside the clone, in the cache folder (`cache_folder()`:
  `$TENANTFLOW_IMAGE_CACHE`, else `/var/cache/tenantflow` for root, else
  `$XDG_CACHE_HOME/tenantflow`), so a fresh clone or `git clean` keeps the built images.

The run state (`--runroot`, `--tmpdir`) lives on a tmpfs (`/run` for root,
`$XDG_RUNTIME_DIR` otherwise) so that podman notices a reboot and forgets the containers
that died with it.

Failures raise `StackError` in one line (`tenantflow-dev` reports it): podman missing says
what to install, a failed command names its verb and podman's last line of error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tenantflow_dev.errors import StackError

if TYPE_CHECKING:
    from tenantflow_dev.config import StackConfig

__all__ = [
    "CACHE_ENV",
    "CONTAINERS_CONF",
    "IMAGE",
    "INSTALL_HINT",
    "Podman",
    "cache_folder",
    "last_line",
    "missing_tools",
    "require_tools",
    "which",
]

log = logging.getLogger("tenantflow_dev")

#: Overrides where podman's storage, the base image's tarball and the build logs live.
CACHE_ENV = "TENANTFLOW_IMAGE_CACHE"
#: The worker image `make image` builds (podman stores it as `localhost/tenantflow-worker`).
IMAGE = "tenantflow-worker:latest"
#: What to run when a tool is missing (the bootstrap installs them from Debian's packages).
INSTALL_HINT = (
    "run `TENANTFLOW_WITH_IMAGE=1 bash scripts/bootstrap.sh` "
    "(apt-get install podman runc uidmap slirp4netns debootstrap)"
)
#: The containers.conf every podman call here reads (and no other).
CONTAINERS_CONF = """\
# Written by tenantflow_dev.podman: the dev stack's podman reads this file alone.
[containers]
# NOTE: podman's default asks for more open files than these machines allow a container.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# NOTE: crun fails here (setrlimit RLIMIT_NOFILE, cgroups in hybrid mode); Debian's runc works.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
#: Where Debian installs the tools (not on a non-root user's PATH).
_SBIN = ("/usr/sbin", "/sbin")


def cache_folder() -> Path:
    """Where the dev stack keeps podman's storage and the base image (outside the clone)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser().resolve()
    if os.geteuid() == 0:
        return Path("/var/cache/tenantflow")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tenantflow"


def _run_folder(cache: Path) -> Path:
    """A tmpfs folder for podman's run state, one per cache folder."""
    name = "tenantflow-podman-" + _short_digest(str(cache))
    if os.geteuid() == 0:
        return Path("/run") / name
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / name if runtime else Path("/tmp") / f"{name}-{os.geteuid()}"  # noqa: S108


def _short_digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def which(tool: str) -> str | None:
    """`tool`'s path, looking in sbin too (runc and debootstrap live there)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(tool, path=path)


def missing_tools(*tools: str) -> list[str]:
    """The tools among `tools` that are not installed here."""
    return [tool for tool in tools if which(tool) is None]


def require_tools(*tools: str) -> None:
    """StackError, in one line saying what to install, when any of `tools` is missing."""
    missing = missing_tools(*tools)
    if missing:
        raise StackError(f"{' and '.join(missing)} not installed: {INSTALL_HINT}")


@dataclass(frozen=True)
class Podman:
    """podman with a storage and a containers.conf of its own (see the module's docstring).

    `argv(...)` gives a command line to run yourself (say, with `Popen` to stream a log);
    `run(...)` runs one and returns its output; the rest are the few questions the dev
    stack and its tests ask podman.
    """

    #: The cache folder: podman's storage under `storage/`, its containers.conf.
    cache: Path
    #: podman's run state, on a tmpfs.
    run_state: Path

    @classmethod
    def from_env(cls, cache: Path | None = None) -> Podman:
        """The dev stack's podman (`cache_folder()`), or one storing in `cache` (a throwaway
        podman for a cold build). Checks podman and runc are installed."""
        require_tools("podman", "runc")
        folder = (cache or cache_folder()).resolve()
        podman = cls(cache=folder, run_state=_run_folder(folder))
        podman._prepare()
        return podman

    @classmethod
    def for_stack(cls, config: StackConfig) -> Podman:
        """The podman of the stack `config` describes: the one cache folder every stack of
        this machine shares (the image is built once for all of them)."""
        del config  # NOTE: one storage per machine: images are big, stacks are many.
        return cls.from_env()

    @property
    def storage(self) -> Path:
        return self.cache / "storage"

    @property
    def conf(self) -> Path:
        return self.cache / "containers.conf"

    def _prepare(self) -> None:
        for folder in (self.storage, self.run_state):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.conf.exists() or self.conf.read_text() != CONTAINERS_CONF:
            partial = self.conf.with_suffix(".partial")
            partial.write_text(CONTAINERS_CONF)
            partial.replace(self.conf)

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment podman runs in: this process's, with the containers.conf."""
        path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
        return {**os.environ, **(extra or {}), "CONTAINERS_CONF": str(self.conf), "PATH": path}

    def argv(self, *args: str) -> list[str]:
        """`podman` with this storage, then `args`."""
        return [
            which("podman") or "podman",
            "--root",
            str(self.storage),
            "--runroot",
            str(self.run_state / "runroot"),
            "--tmpdir",
            str(self.run_state / "libpod"),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float | None = 300,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `podman ARGS`, its output captured as text.

        Raises:
            StackError: with `check`, when podman exits non-zero (its verb and its last line
                of error, which never holds an environment value: settings go in files) or
                runs past `timeout` seconds.
        """
        command = self.argv(*args)
        try:
            done = subprocess.run(  # noqa: S603 (podman with our own arguments)
                command,
                env=self.environment(),
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise StackError(f"podman {args[0]} ran past {timeout:.0f}s") from None
        if check and done.returncode != 0:
            raise StackError(f"podman {args[0]} failed (exit {done.returncode}): {last_line(done)}")
        return done

    def run_detached(
        self,
        image: str,
        *,
        name: str,
        env_file: Path,
        network: str = "host",
        command: Sequence[str] = (),
    ) -> None:
        """`podman run --detach` of `image` as `name`, its environment from `env_file`
        (never a value on the command line), on `network`, with `command` (default: the
        image's own)."""
        self.run(
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            network,
            "--env-file",
            str(env_file),
            image,
            *command,
        )

    def process_environment_names(self, name: str) -> set[str]:
        """The names (never the values) in the environment of the container's PID 1."""
        done = self.run("exec", name, "cat", "/proc/1/environ")
        return {entry.partition("=")[0] for entry in done.stdout.split("\0") if entry}

    def kill(self, name: str) -> None:
        """SIGKILL the container's every process at once (nothing is left to report)."""
        self.run("kill", "--signal", "KILL", name)

    def image_id(self, reference: str) -> str | None:
        """The id of the local image `reference`, or None when there is none."""
        done = self.run("image", "inspect", "--format", "{{.Id}}", reference, check=False)
        if done.returncode != 0:
            return None
        return done.stdout.strip() or None

    def container_running(self, name: str) -> bool:
        done = self.run("container", "inspect", "--format", "{{.State.Running}}", name, check=False)
        return done.returncode == 0 and done.stdout.strip() == "true"

    def logs(self, name: str) -> str:
        """The container's stdout and stderr so far (interleaved as podman stored them)."""
        done = self.run("logs", name, check=False)
        return done.stdout + done.stderr

    def remove(self, name: str, *, stop_seconds: int = 10) -> None:
        """Stop the container (SIGTERM, then SIGKILL after `stop_seconds`) and remove it;
        nothing when there is no such container."""
        self.run("rm", "--force", "--ignore", "--time", str(stop_seconds), name, check=False)


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    """The last non-empty line podman printed (stderr first), shortened for a message."""
    for stream in (done.stderr, done.stdout):
        lines = [line.strip() for line in (stream or "").splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    return "no output"
