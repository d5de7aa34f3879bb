"""Warm starts: the tenantflow process worker's next flow-run process, started ahead.

A flow-run process spends most of its start importing Prefect and the flows' libraries
(a second or more here). The worker keeps one process started ahead for its next run
(`python -m tenantflow.flow_run --warm ENTRYPOINT...`, see `tenantflow.flow_run`): it
imports all that and waits. When a run comes, the worker hands it that process (the run's
entrypoint and per-run variables on its standard input) and starts the next one.

What each run's isolation rests on:

* **one process per run**: a warm process serves exactly one run and exits with it; it is
  a fresh interpreter started by the worker (not a fork of anything that ran code), so no
  module global, setting, connection, thread or event loop of one run is seen by another;
* **the same environment as a cold start**: a warm process starts with the environment
  every run of the worker gets (`flow_run_environment`), and a run is handed one only if
  its own environment, per-run `PREFECT__*` variables aside, is exactly that; it takes
  nothing but `PREFECT__*` variables and one of its declared entrypoints from the worker;
* **no stale code**: the flow files are not imported ahead, and a warm process whose loaded
  modules' files changed since it started replaces itself with a cold process for the run;
* **the same process for the worker**: the handed-off process is the worker's own child,
  streamed, waited for, cancelled and killed exactly as a cold one.

A warm process that dies before it is used is replaced (three quick deaths in a row stop
warm starts until the worker restarts: runs then start cold, as they always can).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from tenantflow.flow_run import PER_RUN_PREFIX, WARM_FLAG, WarmRequest, reserved_environment

__all__ = ["WarmProcess", "WarmStarts", "base_environment", "per_run_variables"]

#: How long a handed-off run that has not ended yet has the CPU to itself before the
#: next process starts (importing takes a second or more of CPU, which on a small
#: machine a sweep would otherwise lose).
REPLACE_AFTER_S = 30.0
#: A warm process that exits within this many seconds of its start died quickly.
_QUICK_DEATH_S = 10.0
#: After this many quick deaths in a row the worker stops starting warm processes.
_QUICK_DEATHS_ALLOWED = 3


def base_environment(env: Mapping[str, str]) -> dict[str, str]:
    """A run's environment without its per-run variables: what a warm process starts with."""
    return {key: value for key, value in env.items() if not key.startswith(PER_RUN_PREFIX)}


def per_run_variables(env: Mapping[str, str]) -> dict[str, str]:
    """A run's own variables (`PREFECT__*`): what a warm process is handed with its run."""
    return {key: value for key, value in env.items() if key.startswith(PER_RUN_PREFIX)}


@dataclass(eq=False)
class WarmProcess:
    """A started flow-run process waiting for its run, and the folder it started in."""

    process: anyio.abc.Process
    folder: Path
    env: dict[str, str]
    started: float
    handed_off: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    async def hand_off(self, request: WarmRequest) -> None:
        """Give the process its run (`WarmStarts.take` gave it out); `OSError` if it is gone."""
        stdin = self.process.stdin
        if stdin is None:
            raise OSError("the warm process has no request pipe")
        try:
            await stdin.send(request.encode())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as error:
            raise OSError("the warm process is gone") from error
        finally:
            with contextlib.suppress(Exception):
                await stdin.aclose()

    def remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    async def discard(self) -> None:
        """Stop an unused process (it exits on its own once its request pipe closes)."""
        self.handed_off = True
        if self.watcher is not None:
            self.watcher.cancel()
        with contextlib.suppress(Exception):
            if self.process.stdin is not None:
                await self.process.stdin.aclose()
        with contextlib.suppress(ProcessLookupError, OSError):
            self.process.terminate()
        with contextlib.suppress(Exception), anyio.move_on_after(5):
            await self.process.wait()
        with contextlib.suppress(ProcessLookupError, OSError):
            self.process.kill()
        self.remove_folder()


class WarmStarts:
    """The worker's one process started ahead of its next run."""

    def __init__(self, entrypoints: Sequence[str], *, say: Any = None) -> None:
        self.entrypoints = tuple(entrypoints)
        self._say = say or (lambda *_: None)
        self._next: WarmProcess | None = None
        self._lock = asyncio.Lock()
        self._quick_deaths = 0
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return (
            bool(self.entrypoints)
            and not self._closed
            and (self._quick_deaths < _QUICK_DEATHS_ALLOWED)
        )

    async def prime(self, env: Mapping[str, str]) -> None:
        """Have a process started for the next run with `env` (a run's base environment)."""
        async with self._lock:
            await self._prime(dict(env))

    async def _prime(self, env: dict[str, str]) -> None:
        if not self.enabled:
            return
        if self._next is not None:
            if self._next.env == env and self._next.process.returncode is None:
                return
            stale, self._next = self._next, None
            await stale.discard()
        folder = Path(tempfile.mkdtemp(prefix="tenantflow-run-"))
        try:
            process = await anyio.open_process(
                [sys.executable, "-m", "tenantflow.flow_run", WARM_FLAG, *self.entrypoints],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**env, **reserved_environment()},
                cwd=folder,
            )
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            self._quick_deaths += 1
            self._say(f"could not start a warm flow-run process: {error}; runs start cold")
            return
        warm = WarmProcess(process=process, folder=folder, env=env, started=time.monotonic())
        warm.watcher = asyncio.create_task(self._watch(warm), name="warm-process")
        self._next = warm

    async def _watch(self, warm: WarmProcess) -> None:
        """Replace a waiting process that died before its run came."""
        code = await warm.process.wait()
        if warm.handed_off:
            return
        lived = time.monotonic() - warm.started
        warm.remove_folder()
        async with self._lock:
            if self._next is not warm:
                return
            self._next = None
            self._quick_deaths = self._quick_deaths + 1 if lived < _QUICK_DEATH_S else 0
            if not self.enabled:
                self._say(
                    f"the warm flow-run process exited with status {code} "
                    f"{_QUICK_DEATHS_ALLOWED} times in a row within {_QUICK_DEATH_S:g}s of "
                    "its start: warm starts are off until the worker restarts; runs start cold"
                )
                return
            self._say(f"the warm flow-run process exited with status {code}: replaced")
            await self._prime(warm.env)

    async def take(self, env: Mapping[str, str], entrypoint: str) -> WarmProcess | None:
        """The waiting process for a run with `env` (its whole environment) and `entrypoint`,
        or None (start the run cold); a process for the next run is started either way."""
        base = base_environment(env)
        async with self._lock:
            warm, self._next = self._next, None
            usable = (
                warm is not None
                and warm.env == base
                and entrypoint in self.entrypoints
                and warm.process.returncode is None
            )
            if warm is not None and not usable:
                await warm.discard()
            if usable:
                assert warm is not None  # noqa: S101 (for the type checker)
                warm.handed_off = True
                if warm.watcher is not None:
                    warm.watcher.cancel()
        # NOTE: the next process imports for a second or more of CPU: it starts once this
        # run's process has had its start (it exits, or `REPLACE_AFTER_S` pass), so the two
        # do not compete for the CPU while this run is beginning.
        self._background(self._prime_after(base, warm.process if usable and warm else None))
        return warm if usable else None

    async def _prime_after(self, env: dict[str, str], started: anyio.abc.Process | None) -> None:
        if started is not None:
            with anyio.move_on_after(REPLACE_AFTER_S), contextlib.suppress(Exception):
                await started.wait()
        await self.prime(env)

    def _background(self, work: Any) -> None:
        task = asyncio.create_task(work, name="warm-prime")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop the waiting process; idempotent."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        async with self._lock:
            warm, self._next = self._next, None
        if warm is not None:
            await warm.discard()
