"""A flow-run process of the tenantflow worker: `python -m tenantflow.flow_run ENTRYPOINT`.

The worker starts every flow run with this command and the absolute entrypoint that its own
`prefect.yaml` declares for the run's deployment. It sets the tripwire
(`tenantflow.tripwire`) first, so nothing in the process can load a flow or run steps from
the deployment as the API stores it, then hands over to Prefect's runtime-entrypoint
engine, which loads the flow from `ENTRYPOINT` only (never from the API) and runs the flow
run named by `PREFECT__FLOW_RUN_ID`, as `python -m prefect.engine` would.

**Warm start** (`python -m tenantflow.flow_run --warm ENTRYPOINT...`): the worker starts
the process of its *next* flow run before that run exists, with the environment every run
of the worker gets. The process sets the tripwire and imports Prefect's engine and what the
declared flow files import (not the flow files themselves), then waits on its standard
input for one line from the worker: `{"entrypoint": ..., "env": {...}}`, the run's
entrypoint (one of those it was started for) and its per-run variables (`PREFECT__*`, the
run's id among them). It then runs that one flow run exactly as a cold process would, and
exits. A process serves one run, never two: nothing of a run is ever seen by another.
Before it runs, it checks that no file of a module it has loaded changed since it started
(a deploy): if one did, it replaces itself with a cold process for the same run
(`os.execve`, same pid, same pipes), so a run never runs stale code.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import importlib
import json
import os
import ssl
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn
from uuid import UUID

from tenantflow.tripwire import install_tripwire

__all__ = [
    "PER_RUN_PREFIX",
    "RESERVED_ENV",
    "WARM_FLAG",
    "WarmRequest",
    "changed_modules",
    "flow_imports",
    "main",
    "publish_environment",
    "read_warm_request",
    "reserved_environment",
    "share_prefect_tls_context",
]

#: The flag of the warm mode, before its entrypoints.
WARM_FLAG = "--warm"
#: Variables a warm process takes from the worker's request: Prefect's per-run variables.
PER_RUN_PREFIX = "PREFECT__"
#: The variable a warm process starts with, whose bytes later hold its run's variables.
RESERVED_ENV = "PREFECT__RESERVED_FOR_RUN"
RESERVED_BYTES = 8192
#: Always loaded by a warm process, whatever the flow files import: Prefect's engine and
#: what it imports only once a run has begun (its parameters' validation, its clients).
_ENGINE_MODULES = (
    "prefect.flow_engine",
    "tenantflow.tenancy",
    "pydantic.v1",
    "anyio._backends._asyncio",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "encodings.idna",
    "rich._emoji_codes",
    "httpx",
    "supabase_auth",
    "supabase_auth.errors",
    "cryptography.hazmat.bindings.openssl.binding",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the flow run of `PREFECT__FLOW_RUN_ID` from the entrypoint in `argv`; exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [WARM_FLAG]:
        return _warm(args[1:])
    install_tripwire()
    share_prefect_tls_context()
    observe_suspension_early()
    from prefect import flow_engine

    # NOTE: `prefect.flow_engine._main([entrypoint])` is what Prefect's own workspace
    # bootstrap calls for a flow run with a known entrypoint (`python -m prefect.flow_engine
    # ENTRYPOINT`); unlike `prefect.engine` it has no fallback to the deployment's storage.
    return int(flow_engine._main(args))


class WarmRequest:
    """The one run a warm process is asked to run: its entrypoint and per-run variables."""

    def __init__(self, entrypoint: str, env: dict[str, str]) -> None:
        self.entrypoint = entrypoint
        self.env = env

    def encode(self) -> bytes:
        return json.dumps({"entrypoint": self.entrypoint, "env": self.env}).encode() + b"\n"


def read_warm_request(line: bytes, entrypoints: Sequence[str]) -> WarmRequest:
    """Parse the worker's request line; only an entrypoint the process was started for and
    only per-run variables are taken.

    Raises:
        ValueError: a malformed line, another entrypoint, or a variable that is not per-run.
    """
    document = json.loads(line)
    entrypoint = document.get("entrypoint") if isinstance(document, dict) else None
    env = document.get("env") if isinstance(document, dict) else None
    if not isinstance(entrypoint, str) or entrypoint not in entrypoints:
        raise ValueError("the request names an entrypoint this process was not started for")
    if not isinstance(env, dict) or not all(
        isinstance(key, str) and key.startswith(PER_RUN_PREFIX) and isinstance(value, str)
        for key, value in env.items()
    ):
        raise ValueError(f"the request may set only {PER_RUN_PREFIX}* variables")
    return WarmRequest(entrypoint, dict(env))


def flow_imports(entrypoints: Iterable[str]) -> list[str]:
    """The modules the entrypoints' files import, but not the flows' own package.

    Read from the files' syntax (nothing of them runs): `import a.b` and `from a.b import c`
    at any depth, relative imports and the package the flow files live in left out.
    """
    modules: dict[str, None] = {}
    for entrypoint in entrypoints:
        path = Path(entrypoint.rpartition(":")[0])
        own = path.parent.name
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except (OSError, SyntaxError, ValueError):
            continue  # the run itself reports it, as a cold process would
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.partition(".")[0] not in {own, "__future__"}:
                    modules[name] = None
    return list(modules)


def changed_modules(since: float) -> list[str]:
    """Loaded modules whose file changed (or went away) after `since` (a `time.time()`)."""
    changed = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        try:
            modified = os.stat(path).st_mtime
        except OSError:
            changed.append(name)
            continue
        if modified >= since:
            changed.append(name)
    return changed


class _SharedVerifiedContexts:
    """`ssl` as Prefect's client module sees it, with one verified context per CA file.

    Prefect builds a new `ssl.create_default_context(cafile=...)` for every API client
    (a run makes three or more), which parses the whole CA bundle each time (about 40 ms
    here). A verified context is never changed after it is made, so one per CA file
    serves every client of the process; anything else (the unverified context Prefect
    makes for `PREFECT_API_TLS_INSECURE_SKIP_VERIFY`, then changes) is made as before.
    """

    def __init__(self) -> None:
        self._contexts: dict[str, tuple[tuple[int, int] | None, ssl.SSLContext]] = {}

    def create_default_context(self, *args: Any, **kwargs: Any) -> ssl.SSLContext:
        cafile = kwargs.get("cafile")
        if args or set(kwargs) != {"cafile"} or not isinstance(cafile, str):
            return ssl.create_default_context(*args, **kwargs)
        # NOTE: made again if the file changed since (a warm process may wait for hours
        # before its run, and CA bundles get replaced).
        version = _file_version(cafile)
        known = self._contexts.get(cafile)
        if known is None or known[0] != version or version is None:
            known = self._contexts[cafile] = (version, ssl.create_default_context(cafile=cafile))
        return known[1]

    def prime(self) -> None:
        """Make the context Prefect's clients will ask for now (a warm process, before
        its run): the CA file `PREFECT_API_SSL_CERT_FILE` names, or certifi's."""
        import certifi
        from prefect.settings import PREFECT_API_SSL_CERT_FILE

        with contextlib.suppress(Exception):  # the run's own client meets any error
            self.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)


def _file_version(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class _EarlySuspensionObserver:
    """Prefect's suspension observer for this process's flow run, started before the
    engine asks for it.

    NOTE: Prefect's engine starts `observe_flow_run_suspension` (a websocket to the
    events API, in a thread) just before it proposes Running, and waits until it is
    connected: 0.1 s or more of every run's start here. This starts that same observer
    as soon as the run's id is known, while the engine reads the run and loads its flow;
    the engine's call then adopts it. A suspension that arrives before the engine has
    its request is kept and handed over, so none is missed.
    """

    def __init__(self, flow_run_id: UUID) -> None:
        from prefect._flow_run_suspension import observe_flow_run_suspension

        self.flow_run_id = flow_run_id
        self._requested: list[Any] = []
        self._request: Any = None
        self._adopted = False
        self._observing = observe_flow_run_suspension(flow_run_id, self)  # type: ignore[arg-type]
        self._entered = threading.Thread(target=self._observing.__enter__, daemon=True)
        self._entered.start()

    def mark_requested(self, state: Any) -> None:
        """What the observer calls on a suspension before the engine registered its own."""
        if self._request is not None:
            self._request.mark_requested(state)
        else:
            self._requested.append(state)

    @contextlib.contextmanager
    def adopted(self, suspension_request: Any) -> Iterator[None]:
        self._adopted = True
        self._request = suspension_request
        for state in self._requested:
            suspension_request.mark_requested(state)
        self._entered.join()
        try:
            yield
        finally:
            self._observing.__exit__(None, None, None)

    def install(self) -> None:
        """Have the engine adopt this observer for its run (any other run: its own)."""
        from prefect import flow_engine

        own = flow_engine.__dict__["observe_flow_run_suspension"]

        @contextlib.contextmanager
        def observe(
            flow_run_id: UUID, suspension_request: Any, polling_interval: float = 10
        ) -> Iterator[None]:
            if flow_run_id != self.flow_run_id or self._adopted:
                with own(flow_run_id, suspension_request, polling_interval):
                    yield
                return
            with self.adopted(suspension_request):
                yield

        setattr(flow_engine, "observe_flow_run_suspension", observe)  # noqa: B010


def observe_suspension_early() -> None:
    """Start the suspension observer of the flow run in `PREFECT__FLOW_RUN_ID` now."""
    with contextlib.suppress(Exception):  # the engine starts its own, as it always did
        _EarlySuspensionObserver(UUID(os.environ["PREFECT__FLOW_RUN_ID"])).install()


def share_prefect_tls_context() -> _SharedVerifiedContexts | None:
    """Have Prefect's API clients in this process share their verified TLS context."""
    from prefect.client import orchestration

    if getattr(orchestration, "ssl", None) is ssl:
        shared = _SharedVerifiedContexts()
        setattr(orchestration, "ssl", shared)  # noqa: B010 (not typed)
        return shared
    current = getattr(orchestration, "ssl", None)
    return current if isinstance(current, _SharedVerifiedContexts) else None


def _warm(entrypoints: Sequence[str]) -> int:
    # NOTE: taken before the first import: a file written while the imports ran counts as
    # changed (mtimes have a coarse grain on some filesystems: one second of margin).
    started = time.time() - 1.0
    install_tripwire()
    contexts = share_prefect_tls_context()
    for name in (*_ENGINE_MODULES, *flow_imports(entrypoints)):
        with contextlib.suppress(Exception):
            importlib.import_module(name)  # a module that fails fails again in the run
    if contexts is not None:
        contexts.prime()
    with contextlib.suppress(Exception):  # Supabase Auth's client meets any error itself
        from tenantflow.auth.supabase import tls_context

        tls_context()
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the worker stopped or let this process go: no run
    request = read_warm_request(line, entrypoints)
    _detach_stdin()
    published = publish_environment(request.env)
    os.environ.update(request.env)
    if not published:
        sys.stderr.write("the run's variables do not fit its warm process: starting it cold\n")
        _exec_cold(request.entrypoint)
    if changed := changed_modules(started):
        # NOTE: a deploy changed code this process had loaded: the run gets a cold process
        # (the same pid and pipes, so the worker sees no difference).
        sys.stderr.write(
            f"{len(changed)} module(s) this warm process had loaded changed since it "
            f"started ({', '.join(sorted(changed)[:3])}...): starting the run cold\n"
        )
        _exec_cold(request.entrypoint)
    observe_suspension_early()
    from prefect import flow_engine

    return int(flow_engine._main([request.entrypoint]))


def _exec_cold(entrypoint: str) -> NoReturn:
    """Become a cold flow-run process for the same run (same pid, pipes, environment)."""
    sys.stderr.flush()
    command = [sys.executable, "-m", "tenantflow.flow_run", entrypoint]
    os.execve(sys.executable, command, dict(os.environ))  # noqa: S606


def reserved_environment() -> dict[str, str]:
    """The variable a warm process is started with to hold its run's variables later."""
    return {RESERVED_ENV: "." * RESERVED_BYTES}


def publish_environment(env: Mapping[str, str]) -> bool:
    """Write the run's variables over the reserved one in the process's original
    environment block (what `/proc/PID/environ` shows); whether they fitted.

    NOTE: a process's `/proc/PID/environ` is the block the kernel copied at exec, which
    `os.environ` changes never touch. Tools (and the tests) find a flow run's process by
    its `PREFECT__FLOW_RUN_ID` there, so a warm process shows its run's variables as a
    cold one does: the worker started it with a reserved variable, whose bytes are
    rewritten in place (as `setproctitle` rewrites argv). Off Linux, or if the reserved
    variable is not where the kernel put it, nothing is written and the run starts cold.
    """
    region = _reserved_region()
    os.environ.pop(RESERVED_ENV, None)  # its entry in the C environ; its bytes stay
    payload = b"\0".join(f"{key}={value}".encode() for key, value in env.items())
    if region is None or len(payload) > region[1]:
        return False
    address, size = region
    ctypes.memmove(address, payload.ljust(size, b"\0"), size)
    return True


def _reserved_region() -> tuple[int, int] | None:
    """Where the reserved variable's bytes are, if inside the exec-time environment."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        # NOTE: env_start and env_end: fields 50 and 51 of proc(5), from the third after
        # the command's name (Linux 3.5 and later).
        start, end = int(fields[47]), int(fields[48])
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    except (OSError, IndexError, ValueError):
        return None
    prefix = f"{RESERVED_ENV}=".encode()
    size = len(prefix) + RESERVED_BYTES
    index = 0
    while (address := environ[index]) is not None:
        inside = start <= address and address + size <= end
        if inside and ctypes.string_at(address, len(prefix)) == prefix:
            return address, size
        index += 1
    return None


def _detach_stdin() -> None:
    """The worker's request pipe is done with: the run reads nothing from it."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


if __name__ == "__main__":
    raise SystemExit(main())
