"""The processes of the local stack: PostgreSQL 15, two PgBouncers, a Prefect server.

The Prefect server keeps its data in its own database `prefect` of the same PostgreSQL
cluster, as its own login `prefect` (or, when asked, in SQLite in its folder).

PostgreSQL and PgBouncer refuse to run as root, so when the stack is started by root
their processes run as the unprivileged `postgres` OS user (created by Debian's
PostgreSQL packages) and own their folders. The process worker runs flow runs, whose
parameters and job variables come from whoever can reach the Prefect API, so it runs as
the unprivileged `tenantflow` OS user (created here when missing). The Prefect server
stays root's, in a folder only root can read, behind basic auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol

import asyncpg
import httpx

from tenantflow.errors import TenantflowError
from tenantflow.localstack.config import (
    PREFECT_DB_NAME,
    PREFECT_DB_ROLE,
    SERVICE_USER,
    WORKER_DB_ROLE,
    WORKER_USER,
    StackConfig,
)

__all__ = [
    "DURABILITY_SETTINGS",
    "PREFECT_RETENTION",
    "Health",
    "HttpProcessService",
    "PgBouncer",
    "Postgres",
    "PrefectServer",
    "Service",
    "StackError",
    "grant_traversal",
    "pid_alive",
    "port_is_open",
    "spawn_detached",
    "stop_process_group",
    "wait_until_ready",
    "worker_user_ids",
]

log = logging.getLogger("tenantflow.stack")

PG_BIN = Path("/usr/lib/postgresql/15/bin")

#: Prepended to the cluster's pg_hba.conf (first match wins): the Prefect server's login
#: reaches its own database only, over TCP.
_HBA_MARKER = "# tenantflow: the Prefect server's role logs in to its own database only"
_HBA_RULES = (
    f"{_HBA_MARKER}\n"
    f"host    {PREFECT_DB_NAME}    {PREFECT_DB_ROLE}    127.0.0.1/32    scram-sha-256\n"
    f"host    all    {PREFECT_DB_ROLE}    all    reject\n"
    f"local   all    {PREFECT_DB_ROLE}    reject\n\n"
)
#: What Prefect's PostgreSQL migrations create (`CREATE EXTENSION IF NOT EXISTS`); created
#: beforehand by the superuser, so the `prefect` role needs no more than its database.
PREFECT_DB_EXTENSIONS = ("pg_trgm",)


#: What a crash must not undo: with any of them off, PostgreSQL may acknowledge a commit
#: that a crash (`pg_ctl restart -m immediate`, a power cut) then loses.
DURABILITY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes")
_THROWAWAY_SETTINGS = (
    "# NOTE: a throwaway test cluster (TENANTFLOW_THROWAWAY_CLUSTER=1): faster, and a\n"
    "# crash may lose acknowledged commits. Never for a cluster whose data matters.\n"
    + "".join(f"{name} = off\n" for name in DURABILITY_SETTINGS)
)
_UNSAFE_LINE = re.compile(rf"^\s*({'|'.join(DURABILITY_SETTINGS)})\s*=\s*'?off'?\s*(#.*)?$")


async def _setting(conn: asyncpg.Connection, name: str) -> str:
    value: str = await conn.fetchval(f"SHOW {name}")
    return value


class StackError(TenantflowError, RuntimeError):
    """The local stack could not be brought to the asked state."""


@dataclass(frozen=True)
class Health:
    name: str
    address: str
    running: bool
    healthy: bool
    pid: int | None
    detail: str = ""


class Service(Protocol):
    name: str

    def start(self) -> bool:
        """Start if not running; return False when it was already running."""

    def stop(self) -> bool:
        """Stop if running; return False when it was not running."""

    def health(self) -> Health: ...


def port_is_open(host: str, port: int, timeout: float = 0.3) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
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


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _service_ids() -> tuple[int, int] | None:
    """uid/gid of the unprivileged service user, when running as root."""
    if not _running_as_root():
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise StackError(
            f"running as root needs the '{SERVICE_USER}' OS user (Debian's postgresql "
            "package creates it); run `make up` to install it"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _as_service_user(argv: list[str]) -> list[str]:
    if _running_as_root():
        return ["runuser", "-u", SERVICE_USER, "--", *argv]
    return argv


def grant_traversal(path: Path) -> None:
    """Let other OS users traverse (not list) every folder above `path`.

    NOTE: a clone under a private folder (mktemp -d is 0700) would hide the stack from
    the service users; traversal alone reveals no names.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
            log.info("granted other users traversal (o+x) of %s", parent)


def _service_dir(path: Path) -> Path:
    """Create a folder the service user owns, and make sure it can reach it."""
    path.mkdir(parents=True, exist_ok=True)
    ids = _service_ids()
    if ids is not None:
        os.chown(path, *ids)
        grant_traversal(path)
    path.chmod(0o700)
    return path


def worker_user_ids() -> tuple[int, int] | None:
    """uid/gid of the worker's OS user when running as root (created when missing)."""
    if not _running_as_root():
        return None
    try:
        entry = pwd.getpwnam(WORKER_USER)
    except KeyError:
        result = subprocess.run(  # noqa: S603
            [
                shutil.which("useradd") or "/usr/sbin/useradd",
                "--system",
                "--no-create-home",
                "--user-group",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                WORKER_USER,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            # NOTE: another stack may have created it meanwhile (useradd then exits 9).
            entry = pwd.getpwnam(WORKER_USER)
        except KeyError:
            output = (result.stderr or result.stdout).strip()
            raise StackError(
                f"could not create the '{WORKER_USER}' OS user for the worker: {output}"
            ) from None
    return entry.pw_uid, entry.pw_gid


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise StackError(f"{what} failed (exit {result.returncode}): {output}")


def _require_free(host: str, port: int, name: str, variable: str) -> None:
    if port_is_open(host, port):
        raise StackError(
            f"{name}: port {port} on {host} is already taken by another program; "
            f"stop it or choose another port with {variable}"
        )


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

    _wait(check, timeout, f"{what} to answer")


def stop_process_group(pid: int, *, grace: float, what: str) -> None:
    """SIGTERM the process group; SIGKILL it if `pid` has not exited after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    try:
        _wait(lambda: not pid_alive(pid), grace, f"{what} to exit")
    except StackError:
        log.warning("%s did not exit within %.0fs; killing it", what, grace)
    # NOTE: children (uvicorn, services) share the group; none may outlive the leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _wait(lambda: not pid_alive(pid), 5, f"{what} to be killed")


class Postgres:
    """A PostgreSQL 15 cluster in the stack folder, scram auth, 127.0.0.1 only."""

    name = "postgres"

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.root = config.stack_dir / "postgres"
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.logfile = self.root / "postgres.log"

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.pg_port}"

    def pid(self) -> int | None:
        pid = _read_pid(self.data / "postmaster.pid")
        return pid if pid_alive(pid) else None

    def _initdb(self) -> None:
        secrets = self.config.secrets
        _service_dir(self.root)
        _service_dir(self.sockets)
        ids = _service_ids()
        with tempfile.NamedTemporaryFile("w", dir=self.root, delete=False) as pwfile:
            pwfile.write(secrets.admin_password + "\n")
        try:
            if ids is not None:
                os.chown(pwfile.name, *ids)
            _run(
                _as_service_user(
                    [
                        str(PG_BIN / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "supabase_admin",
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile.name}",
                        "--encoding=UTF8",
                        "--locale=C",
                    ]
                ),
                "initdb",
            )
        finally:
            os.unlink(pwfile.name)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(self.conf_text())

    def conf_text(self) -> str:
        """What the stack appends to a new cluster's postgresql.conf.

        Durable (PostgreSQL's defaults: fsync, synchronous_commit, full_page_writes on)
        unless the config is a throwaway test cluster.
        """
        return (
            "\n# tenantflow local stack\n"
            f"listen_addresses = '{self.config.host}'\n"
            f"port = {self.config.pg_port}\n"
            f"unix_socket_directories = '{self.sockets}'\n"
            "max_connections = 300\n"
            "shared_preload_libraries = 'pg_stat_statements'\n"
            "log_line_prefix = '%m [%p] %q%u@%d '\n"
        ) + (_THROWAWAY_SETTINGS if self.config.throwaway else "")

    def _durable_conf(self) -> bool:
        """Drop the durability trade-offs an older stack wrote into postgresql.conf.

        Returns whether the file changed. A throwaway cluster keeps them.
        """
        conf = self.data / "postgresql.conf"
        if self.config.throwaway or not conf.exists():
            return False
        text = conf.read_text()
        kept = [line for line in text.splitlines(keepends=True) if not _UNSAFE_LINE.match(line)]
        if len(kept) == len(text.splitlines(keepends=True)):
            return False
        # NOTE: in place, so the file keeps its owner (the service user) and mode.
        with conf.open("r+") as handle:
            handle.write("".join(kept))
            handle.truncate()
        return True

    def ensure_durable(self) -> list[str]:
        """Make a running cluster durable: fsync, synchronous_commit, full_page_writes on.

        Returns the settings that were off (and are now on). A cluster created by an
        older stack ran with them off; `ALTER SYSTEM` and a reload fix it without a
        restart (all three take effect on reload). A throwaway cluster is left alone.
        """
        if self.config.throwaway or self.pid() is None:
            return []
        changed = self._durable_conf()

        async def ensure() -> list[str]:
            parts = self.config.connect_parts(self.config.pg_port, admin=True)
            conn = await asyncpg.connect(**parts)
            try:
                if changed:
                    await conn.execute("SELECT pg_reload_conf()")
                off = [name for name in DURABILITY_SETTINGS if await _setting(conn, name) != "on"]
                for name in off:
                    await conn.execute(f"ALTER SYSTEM SET {name} = on")
                if off:
                    await conn.execute("SELECT pg_reload_conf()")
                # NOTE: a reload is a signal; each backend applies it between statements.
                deadline = time.monotonic() + 10
                while any([await _setting(conn, name) != "on" for name in DURABILITY_SETTINGS]):
                    if time.monotonic() > deadline:
                        raise StackError(
                            f"PostgreSQL still runs with one of {', '.join(DURABILITY_SETTINGS)} "
                            f"off after a reload; see {self.data / 'postgresql.conf'}"
                        )
                    await asyncio.sleep(0.1)
                return off
            finally:
                await conn.close()

        return asyncio.run(ensure())

    def _restrict_prefect_role(self) -> bool:
        """Let the `prefect` login reach database `prefect` only (pg_hba.conf, first match).

        NOTE: in pg_hba.conf rather than by revoking CONNECT on `postgres` from PUBLIC,
        which would also change what every other role of the Supabase-like cluster may do.
        Returns whether the file changed (a running cluster must then reload it).
        """
        hba = self.data / "pg_hba.conf"
        text = hba.read_text()
        if _HBA_MARKER in text:
            return False
        hba.write_text(_HBA_RULES + text)
        return True

    def ensure_prefect_database(self) -> None:
        """The Prefect server's database and login on a running cluster (idempotent).

        NOTE: for a cluster started before the stack had them (an older stack folder that
        was not restarted); a fresh start creates them in `_bootstrap` already.
        """
        if self.pid() is None:
            raise StackError(
                "the Prefect server keeps its data in the stack's PostgreSQL, which is not "
                "running (or set TENANTFLOW_PREFECT_DATABASE=sqlite)"
            )
        reload = self._restrict_prefect_role()

        async def ensure() -> None:
            parts = self.config.connect_parts(self.config.pg_port, admin=True)
            conn = await asyncpg.connect(**parts)
            try:
                await conn.execute("SET pg_stat_statements.track_utility = off")
                if reload:
                    await conn.execute("SELECT pg_reload_conf()")
                await self._bootstrap_prefect(conn)
            finally:
                await conn.close()

        asyncio.run(ensure())

    def start(self) -> bool:
        if self.pid() is not None:
            return False
        _require_free(self.config.host, self.config.pg_port, "postgres", "TENANTFLOW_PG_PORT")
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        self._restrict_prefect_role()
        self._durable_conf()
        _service_dir(self.sockets)
        _run(
            _as_service_user(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.logfile),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            "starting PostgreSQL",
        )
        asyncio.run(self._bootstrap())
        return True

    async def _bootstrap(self) -> None:
        """Supabase's roles, `auth` schema and privilege model (idempotent)."""
        sql = resources.files("tenantflow.localstack").joinpath("supabase_bootstrap.sql")
        conn = await asyncpg.connect(**self.config.connect_parts(self.config.pg_port, admin=True))
        try:
            # NOTE: pg_stat_statements keeps utility statements' text as sent, passwords
            # included; none of this session's statements is worth tracking.
            await conn.execute("SET pg_stat_statements.track_utility = off")
            await conn.execute(sql.read_text())
            # NOTE: ALTER ROLE ... PASSWORD takes no bind parameters; quote it server-side.
            secrets = self.config.secrets
            literal = await conn.fetchval("SELECT quote_literal($1)", secrets.postgres_password)
            await conn.execute(f"ALTER ROLE postgres PASSWORD {literal}")
            # The workers' login, as a project's administrator creates it before migrating
            # (the migrations grant it what it may do, nothing more).
            literal = await conn.fetchval("SELECT quote_literal($1)", secrets.worker_password)
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", WORKER_DB_ROLE):
                await conn.execute(f"CREATE ROLE {WORKER_DB_ROLE} NOINHERIT")
            await conn.execute(f"ALTER ROLE {WORKER_DB_ROLE} LOGIN PASSWORD {literal}")
            await self._bootstrap_prefect(conn)
            # Older stack folders tracked them: forget those entries.
            if await conn.fetchval("SELECT to_regclass('public.pg_stat_statements')"):
                await conn.execute(
                    "SELECT pg_stat_statements_reset(userid, dbid, queryid) "
                    "FROM pg_stat_statements WHERE query ILIKE '%PASSWORD%'"
                )
        finally:
            await conn.close()

    async def _bootstrap_prefect(self, conn: asyncpg.Connection) -> None:
        """The Prefect server's database and login (idempotent), as the superuser.

        The role owns its database and nothing else: no superuser, CREATEROLE, CREATEDB,
        BYPASSRLS or replication; pg_hba.conf keeps it out of every other database, and
        only it (and superusers) may connect to `prefect`.
        """
        literal = await conn.fetchval(
            "SELECT quote_literal($1)", self.config.secrets.prefect_db_password
        )
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", PREFECT_DB_ROLE):
            await conn.execute(f"CREATE ROLE {PREFECT_DB_ROLE}")
        await conn.execute(
            f"ALTER ROLE {PREFECT_DB_ROLE} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB "
            f"NOBYPASSRLS NOREPLICATION INHERIT PASSWORD {literal}"
        )
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PREFECT_DB_NAME):
            # NOTE: CREATE DATABASE cannot run in a transaction; one statement is not in one.
            await conn.execute(f"CREATE DATABASE {PREFECT_DB_NAME} OWNER {PREFECT_DB_ROLE}")
        await conn.execute(f"ALTER DATABASE {PREFECT_DB_NAME} OWNER TO {PREFECT_DB_ROLE}")
        await conn.execute(f"REVOKE ALL ON DATABASE {PREFECT_DB_NAME} FROM PUBLIC")
        parts = self.config.connect_parts(self.config.pg_port, admin=True)
        prefect = await asyncpg.connect(**{**parts, "database": PREFECT_DB_NAME})
        try:
            for extension in PREFECT_DB_EXTENSIONS:
                await prefect.execute(f"CREATE EXTENSION IF NOT EXISTS {extension}")
        finally:
            await prefect.close()

    async def scram_secret(self, role: str = "postgres") -> str:
        conn = await asyncpg.connect(**self.config.connect_parts(self.config.pg_port, admin=True))
        try:
            secret: str = await conn.fetchval(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role
            )
        finally:
            await conn.close()
        return secret

    def stop(self) -> bool:
        if self.pid() is None:
            return False
        _run(
            _as_service_user(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]
            ),
            "stopping PostgreSQL",
        )
        return True

    def health(self) -> Health:
        pid = self.pid()
        healthy, detail = False, "not running"
        if pid is not None:
            healthy, detail = _query_ok(self.config.connect_parts(self.config.pg_port))
        return Health(self.name, self.address, pid is not None, healthy, pid, detail)


PoolMode = Literal["transaction", "session"]


class PgBouncer:
    """One PgBouncer process (Debian's package) in transaction or session mode."""

    def __init__(self, config: StackConfig, mode: PoolMode) -> None:
        self.config = config
        self.mode = mode
        self.name = f"pgbouncer-{mode}"
        self.port = (
            config.transaction_pooler_port if mode == "transaction" else config.session_pooler_port
        )
        self.root = config.stack_dir / "pgbouncer"
        self.ini = self.root / f"{mode}.ini"
        self.pidfile = self.root / f"{mode}.pid"
        self.logfile = self.root / f"{mode}.log"
        self.userlist = self.root / "userlist.txt"

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def pid(self) -> int | None:
        pid = _read_pid(self.pidfile)
        return pid if pid_alive(pid) else None

    def _write_config(self, scram_secrets: dict[str, str]) -> None:
        _service_dir(self.root)
        ids = _service_ids()
        self.userlist.write_text(
            "".join(f'"{role}" "{secret}"\n' for role, secret in scram_secrets.items())
        )
        self.userlist.chmod(0o600)
        self.ini.write_text(
            "[databases]\n"
            f"* = host={self.config.host} port={self.config.pg_port}\n"
            "\n[pgbouncer]\n"
            f"listen_addr = {self.config.host}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {self.userlist}\n"
            f"pool_mode = {self.mode}\n"
            f"default_pool_size = {self.config.pooler_pool_size}\n"
            "max_client_conn = 2000\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.logfile}\n"
            f"pidfile = {self.pidfile}\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
        )
        if ids is not None:
            for path in (self.userlist, self.ini):
                os.chown(path, *ids)

    def start(self) -> bool:
        if self.pid() is not None:
            return False
        variable = (
            "TENANTFLOW_TRANSACTION_POOLER_PORT"
            if self.mode == "transaction"
            else "TENANTFLOW_SESSION_POOLER_PORT"
        )
        _require_free(self.config.host, self.port, self.name, variable)
        pgbouncer = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        postgres = Postgres(self.config)
        self._write_config(
            {
                role: asyncio.run(postgres.scram_secret(role))
                for role in ("postgres", WORKER_DB_ROLE)
            }
        )
        _run(_as_service_user([pgbouncer, "-d", str(self.ini)]), f"starting {self.name}")
        _wait(lambda: port_is_open(self.config.host, self.port), 15, f"{self.name} to listen")
        return True

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not pid_alive(pid), 15, f"{self.name} to exit")
        return True

    def health(self) -> Health:
        pid = self.pid()
        healthy, detail = False, "not running"
        if pid is not None:
            healthy, detail = _query_ok(self.config.connect_parts(self.port))
        return Health(self.name, self.address, pid is not None, healthy, pid, detail)


class HttpProcessService:
    """A stack service that is one process group of ours, healthy when it answers HTTP.

    Subclasses say how to start it (`argv`, `environment`, `prepare`) and how to ask it
    (`answers`); starting, waiting, stopping and reporting live here once.
    """

    name: str
    what: str
    folder: str
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
        pid = _read_pid(self.pidfile)
        return pid if pid_alive(pid) else None

    def start(self) -> bool:
        if self.pid() is not None:
            return False
        _require_free(self.config.host, self.port, self.name, self.port_variable)
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


class PrefectServer(HttpProcessService):
    """`prefect server start`, its home in the stack folder, its data in PostgreSQL.

    The data lives in the database `prefect` of the stack's cluster, reached directly as
    the role `prefect` (`TENANTFLOW_PREFECT_DATABASE=sqlite`: in SQLite in its home).
    Whoever reaches the API can start flow runs, so it wants basic auth (the stack's
    `prefect_auth_string`; `/api/health` alone answers without), answers CORS for its own
    UI only, and keeps its folder and files from other OS users (0700, umask 077).
    """

    name = "prefect-server"
    what = "the Prefect server"
    folder = "prefect"
    port_variable = "TENANTFLOW_PREFECT_PORT"
    ready_timeout = 90
    stop_grace = 20
    umask = 0o077

    def prepare(self) -> None:
        if self.config.prefect_database == "postgres":
            Postgres(self.config).ensure_prefect_database()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        # NOTE: files written before the umask was set (an older stack folder) lose
        # their group and other bits too.
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                path = Path(folder) / name
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode & 0o700)

    @property
    def port(self) -> int:
        return self.config.prefect_port

    @property
    def address(self) -> str:
        return self.config.prefect_ui_url

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "prefect", "server", "start", "--no-prompt"]

    def answers(self) -> bool:
        return _prefect_healthy(self.config)

    @property
    def database_kind(self) -> str:
        return "PostgreSQL" if self.config.prefect_database == "postgres" else "SQLite"

    def health(self) -> Health:
        found = super().health()
        if found.running and not found.healthy and _prefect_open(self.config):
            # NOTE: a server started before the stack had an auth string answers anyone.
            detail = "answers without auth: restart it (make down && make up)"
            return Health(self.name, self.address, True, False, found.pid, detail)
        if found.healthy:
            return Health(self.name, self.address, True, True, found.pid, self.database_kind)
        return found

    def environment(self) -> dict[str, str]:
        # NOTE: no database setting of ours may come from the caller's environment (a
        # developer's shell pointing Prefect at another database).
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_"))
        }
        env.update(
            {
                "PREFECT_HOME": str(self.root),
                # NOTE: holds the `prefect` role's password: this process's environment
                # only (readable by its own OS user alone), never printed.
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.config.prefect_database_url,
                "PREFECT_SERVER_API_AUTH_STRING": self.config.secrets.prefect_auth_string,
                "PREFECT_API_AUTH_STRING": self.config.secrets.prefect_auth_string,
                # NOTE: the UI calls the API from its own origin only; no other web page
                # may (the default is `*`).
                "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": self.config.prefect_ui_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_API_HOST": self.config.host,
                "PREFECT_SERVER_API_PORT": str(self.config.prefect_port),
                "PREFECT_API_URL": self.config.prefect_api_url,
                "PREFECT_UI_API_URL": self.config.prefect_api_url,
                "PREFECT_LOGGING_LEVEL": "WARNING",
                # NOTE: one flow run with 1,000 tenant tasks means thousands of task-run
                # events; the default batches of 1 kept the server's core busy for minutes.
                "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
                "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "100",
                "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
                "PREFECT_SERVER_SERVICES_TRIGGERS_READ_BATCH_SIZE": "100",
                **PREFECT_RETENTION,
            }
        )
        return env


#: Retention on the stack's Prefect server.
#: NOTE: every nightly sweep adds flow runs, thousands of task runs, their logs and events;
#: without these the Prefect database grows without bound. Prefect's vacuum service
#: deletes events after the events retention period (its default: events only), and
#: with `flow_runs` enabled also finished top-level flow runs whose end is older than its
#: own retention period, with their task runs, logs and artifacts (and, daily, orphans).
PREFECT_RETENTION = {
    # NOTE: ISO 8601 durations: the events setting takes no plain seconds.
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P7D",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": "P14D",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "3600",
}


def _prefect_healthy(config: StackConfig) -> bool:
    # NOTE: `/health` answers without auth; an authenticated route also proves that the
    # server takes this stack folder's auth string, and a refused anonymous one that it
    # wants auth at all.
    if _prefect_open(config):
        return False
    try:
        response = httpx.get(
            f"{config.prefect_api_url}/admin/version",
            headers=config.prefect_api_headers(),
            timeout=2,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _prefect_open(config: StackConfig) -> bool:
    """Whether the server answers an API request that carries no auth."""
    try:
        response = httpx.get(f"{config.prefect_api_url}/admin/version", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _query_ok(parts: dict[str, object]) -> tuple[bool, str]:
    async def probe() -> str:
        conn = await asyncpg.connect(**parts, timeout=3, statement_cache_size=0)
        try:
            version: str = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
        return version

    try:
        return True, f"PostgreSQL {asyncio.run(probe())}"
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        return False, type(error).__name__
