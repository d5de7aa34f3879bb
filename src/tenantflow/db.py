"""The database layer: engines, the session pattern and transaction-local settings.

Two endpoints, never mixed up:

* `transaction_engine()` — the transaction pooler (Supavisor 6543 / PgBouncer
  `pool_mode=transaction`). A server connection is ours only for the length of one
  transaction, so nothing may outlive a transaction: no prepared statements with
  names (asyncpg's statement cache is off, asyncpg then uses the unnamed statement),
  no session-level `SET`, no session-level advisory locks. Statements that would
  leave such state behind are refused before they reach the pooler.
* `build_migration_engine()` — the session pooler, `NullPool`, one engine per migration
  run (`tenantflow.migrate` creates and disposes it); never cached, never shared.

An `AsyncEngine` belongs to the event loop it was first used on. Prefect runs
submitted or mapped async tasks with `asyncio.run` in pool threads, one new loop
each, so engines are kept per running loop and disposed when that loop shuts down
(the same scheme as Prefect's own server).

How the engine keeps to the transaction pooler's rules: docs/connections.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import weakref
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import TextClause

from tenantflow.errors import TenantflowError
from tenantflow.settings import Settings, get_settings

__all__ = [
    "Executor",
    "LaneConnection",
    "LaneResult",
    "LaneRow",
    "SessionStateError",
    "build_migration_engine",
    "build_transaction_engine",
    "connection_lane",
    "describe_error",
    "dispose_engines",
    "is_database_unreachable",
    "is_transient_database_error",
    "lane_connections",
    "ping",
    "session_scope",
    "session_state_refusal",
    "set_local",
    "transaction_engine",
    "unit_of_work",
    "warm_up",
]

#: (id of the event loop, DATABASE_URL)
_EngineKey = tuple[int, str]

_ENGINES: dict[_EngineKey, AsyncEngine] = {}

# NOTE: custom settings (`request.jwt.claims`) need a dot; built-in ones are plain words.
_SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")

# Statements that leave state on a pooled server connection after the transaction ends.
_SESSION_STATE = re.compile(
    r"""^\s*(
        set\s+(?!local\b)(?!transaction\b)(?!constraints\b)   # SET x / SET SESSION x
      | reset\b | discard\b | listen\b | prepare\b | deallocate\b
    )""",
    re.IGNORECASE | re.VERBOSE,
)
_SESSION_LOCK = re.compile(r"\bpg_(try_)?advisory_(un)?lock(_shared)?\s*\(", re.IGNORECASE)
_SESSION_SET_CONFIG = re.compile(r"\bset_config\s*\([^)]*,\s*false\s*\)", re.IGNORECASE)


class SessionStateError(TenantflowError, RuntimeError):
    """A statement would leave session-level state on a transaction-pooler connection."""


def session_state_refusal(statement: str) -> str | None:
    """Why `statement` may not go through the transaction pooler, or None if it may.

    Refused: what would leave state on the pooled server connection after the
    transaction ends (`SET` without `LOCAL`, `RESET`, `DISCARD`, `LISTEN`, `PREPARE`,
    `DEALLOCATE`, session advisory locks, `set_config(..., false)`).
    """
    if (
        _SESSION_STATE.match(statement)
        or _SESSION_LOCK.search(statement)
        or _SESSION_SET_CONFIG.search(statement)
    ):
        head = statement.strip().split(None, 2)[:2]
        return (
            f"refused {' '.join(head)!s}...: session-level state is not allowed through the "
            "transaction pooler; use SET LOCAL / set_config(..., true) or "
            "pg_advisory_xact_lock inside the transaction"
        )
    return None


def _refuse_session_state(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    """Engine hook: refuse session-level state before it reaches the transaction pooler."""
    refusal = session_state_refusal(statement)
    if refusal:
        raise SessionStateError(refusal)


# NOTE: serialization/deadlock, admin shutdown, connection failures, too many connections.
_TRANSIENT_SQLSTATES = frozenset(
    {"40001", "40P01", "57P01", "57P02", "57P03", "08000", "08001", "08003", "08004", "08006"}
    | {"53300", "53400"}
)


# NOTE: PgBouncer refuses logins for `server_login_retry` seconds after the server came
# back ("server login has been failing, try again later"), with a protocol-level code.
_POOLER_RETRY = re.compile(r"server login has been failing|server conn crashed", re.IGNORECASE)
_OUTAGE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "08000", "08001", "08003", "08004"})


def _sqlstate(error: BaseException) -> str | None:
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def is_database_unreachable(error: BaseException) -> bool:
    """Whether the database (or its pooler) is down for everyone, not just this unit:
    lost or refused connections, a shutdown, the pooler's login-retry refusal."""
    if isinstance(error, sa_exc.TimeoutError):  # the client pool had no connection to give
        return True
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    if _sqlstate(error) in _OUTAGE_SQLSTATES | {"08006"}:
        return True
    if _POOLER_RETRY.search(str(error)):
        return True
    # NOTE: a lane's statements reach asyncpg directly. Its error for a connection the
    # pooler closed (its server connection died) is what SQLAlchemy calls a disconnect;
    # and when the pooler's error for the dying server connection arrives between two
    # statements, before it hangs up, the next statement finds the protocol still busy
    # with it ("another operation is in progress"): the same loss, a moment earlier.
    if isinstance(error, asyncpg.InterfaceError) and "connection is closed" in str(error):
        return True
    if isinstance(error, asyncpg.InternalClientError) and "is in progress" in str(error):
        return True
    return isinstance(error, ConnectionError | TimeoutError | OSError)


def is_transient_database_error(error: BaseException) -> bool:
    """Whether retrying the same unit of work may succeed (the retry policy of tasks)."""
    return is_database_unreachable(error) or _sqlstate(error) in _TRANSIENT_SQLSTATES


async def ping(settings: Settings | None = None) -> None:
    """One `SELECT 1` through the transaction pooler on a fresh checkout; raises if down."""
    engine = await transaction_engine(settings)
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


async def warm_up(settings: Settings | None = None, *, connections: int = 2) -> None:
    """Open the transaction pooler's first pooled connections (`connections` at once)
    ahead of the first units of work (a login is the slowest part of a unit), while
    other work waits on something else; a failure is left for those units to meet."""
    with contextlib.suppress(Exception):
        engine = await transaction_engine(settings)
        async with contextlib.AsyncExitStack() as opened:
            await asyncio.gather(
                *(opened.enter_async_context(engine.connect()) for _ in range(connections))
            )


def describe_error(error: BaseException) -> str:
    """A one-line account of a failure, fit for logs and artifacts.

    NOTE: SQLAlchemy's own text repeats the SQL and its bound parameters (which may
    hold claims or client data); this keeps the driver's error class and first line.
    """
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        cause = error.orig.__cause__ or error.orig
        first = (str(cause).strip().splitlines() or [""])[0]
        return f"{type(cause).__name__}: {first}"[:300]
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}"[:300] if first else type(error).__name__


def _pool_arguments(settings: Settings) -> dict[str, Any]:
    if settings.db_pool_mode == "null":
        return {"poolclass": NullPool}
    return {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_recycle": settings.db_pool_recycle,
        "pool_pre_ping": settings.db_pool_pre_ping,
        "pool_timeout": settings.db_pool_timeout,
    }


def build_transaction_engine(settings: Settings) -> AsyncEngine:
    """Create (not cache) an engine for the transaction pooler. Prefer `transaction_engine()`."""
    engine = create_async_engine(
        make_url(settings.database_url.get_secret_value()),
        connect_args={
            # NOTE: both caches off. asyncpg's own cache names statements, which live on
            # the server connection; SQLAlchemy's cache would re-use an unnamed statement
            # the pooler may have replaced. Measured: 0 errors, 0 leftover statements.
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "timeout": settings.db_connect_timeout,
        },
        # NOTE: SQLAlchemy's error text would otherwise repeat the bound values (verified
        # claims, client data) into exception messages that reach the Prefect UI.
        hide_parameters=True,
        **_pool_arguments(settings),
    )
    event.listen(engine.sync_engine, "before_cursor_execute", _refuse_session_state)
    return engine


def build_migration_engine(settings: Settings) -> AsyncEngine:
    """Create (not cache) a NullPool engine for the session pooler."""
    return create_async_engine(
        make_url(settings.migration_url().get_secret_value()),
        poolclass=NullPool,
        connect_args={"timeout": settings.db_connect_timeout},
        hide_parameters=True,
    )


async def _engine_for_this_loop(settings: Settings) -> AsyncEngine:
    loop = asyncio.get_running_loop()
    key: _EngineKey = (id(loop), settings.database_url.get_secret_value())
    engine = _ENGINES.get(key)
    if engine is not None:
        return engine
    engine = build_transaction_engine(settings)
    _ENGINES[key] = engine

    async def dispose() -> None:
        stale = _ENGINES.pop(key, None)
        if stale is not None:
            await stale.dispose()

    # NOTE: imported here so processes that only need the database layer do not pay
    # for importing Prefect (seconds on a busy machine).
    from prefect.utilities.asyncutils import add_event_loop_shutdown_callback

    await add_event_loop_shutdown_callback(dispose)
    return engine


async def transaction_engine(settings: Settings | None = None) -> AsyncEngine:
    """The transaction-pooler engine of the running event loop (created on first use)."""
    return await _engine_for_this_loop(settings or get_settings())


async def dispose_engines() -> int:
    """Dispose every engine of the running loop now; returns how many were disposed."""
    loop_id = id(asyncio.get_running_loop())
    keys = [key for key in _ENGINES if key[0] == loop_id]
    for key in keys:
        await _ENGINES.pop(key).dispose()
    return len(keys)


@asynccontextmanager
async def session_scope(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit on success, roll back on any exception, always close."""
    async with AsyncSession(engine, expire_on_commit=False) as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


def _set_config_arguments(values: Mapping[str, str]) -> list[str]:
    """`name, value, name, value, ...` for `_set_config_sql(len(values))`, names checked."""
    arguments: list[str] = []
    for name, value in values.items():
        if not _SETTING_NAME.match(name):
            raise ValueError(f"not a valid setting name: {name!r}")
        arguments += (name, value)
    return arguments


def _literal(value: str) -> str:
    """`value` as a PostgreSQL escape string literal (`E'...'`), read the same whatever
    `standard_conforming_strings` is."""
    if "\x00" in value:
        raise ValueError("a setting's value cannot hold a NUL character")
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@functools.lru_cache(maxsize=64)
def _begin_sql(values: tuple[tuple[str, str], ...]) -> str:
    """`BEGIN` and transaction-local `set_config` calls with their values written in, as
    one simple query (one round trip); names checked as `set_local` checks them."""
    _set_config_arguments(dict(values))  # refuses a name that is not a setting's
    calls = ", ".join(
        f"set_config({_literal(name)}, {_literal(value)}, true)" for name, value in values
    )
    return f"BEGIN; SELECT {calls}" if calls else "BEGIN"


@functools.cache
def _set_config_sql(count: int, marker: str = "$") -> str:
    """One `SELECT` of `count` transaction-local `set_config` calls, for name/value pairs
    bound in order: `$1, $2, ...` (asyncpg) or, with `marker=":p"`, `:p1, :p2, ...`."""
    calls = (f"set_config({marker}{2 * n + 1}, {marker}{2 * n + 2}, true)" for n in range(count))
    return "SELECT " + ", ".join(calls)


async def set_local(session: Executor, values: Mapping[str, str]) -> None:
    """Set transaction-local settings (`set_config(name, value, true)`) in one round trip."""
    if not values:
        return
    arguments = _set_config_arguments(values)
    if isinstance(session, LaneConnection):
        await session.set_local(arguments)
        return
    sql = _set_config_sql(len(values), ":p")
    await session.execute(text(sql), {f"p{n + 1}": v for n, v in enumerate(arguments)})


class LaneRow(asyncpg.Record):  # type: ignore[misc]
    """A row on a lane: by position, by column name (`row["day"]`), or as an attribute
    (`row.day`), as SQLAlchemy's rows are read."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class LaneResult:
    """The rows of one statement on a lane, read as SQLAlchemy's `Result` is read."""

    __slots__ = ("_rows",)

    def __init__(self, rows: Sequence[LaneRow]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[LaneRow]:
        return iter(self._rows)

    def all(self) -> list[LaneRow]:
        return list(self._rows)

    def first(self) -> LaneRow | None:
        return self._rows[0] if self._rows else None

    def one_or_none(self) -> LaneRow | None:
        if len(self._rows) > 1:
            raise sa_exc.MultipleResultsFound(
                "Multiple rows were found when one or none was required"
            )
        return self.first()

    def one(self) -> LaneRow:
        row = self.one_or_none()
        if row is None:
            raise sa_exc.NoResultFound("No row was found when one was required")
        return row

    def scalar(self) -> Any:
        row = self.first()
        return None if row is None else row[0]

    def scalar_one_or_none(self) -> Any:
        row = self.one_or_none()
        return None if row is None else row[0]

    def scalar_one(self) -> Any:
        return self.one()[0]


@dataclass(frozen=True)
class _LaneStatement:
    """A `text()` statement as the lane sends it: SQLAlchemy's own rendering for asyncpg
    (`$n` placeholders), the parameters' names in their order, their bound defaults."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]

    @classmethod
    def of(cls, statement: TextClause, dialect: Dialect) -> _LaneStatement:
        compiled = statement.compile(dialect=dialect)
        refusal = session_state_refusal(compiled.string)
        if refusal:
            raise SessionStateError(refusal)
        binds = compiled.binds.values()
        if any(bind.expanding or bind.literal_execute for bind in binds) or any(
            compiled._bind_processors.values()
        ):
            raise TypeError("a lane sends text() with plain bound parameters only")
        defaults = {bind.key: bind.value for bind in binds if not bind.required}
        return cls(compiled.string, tuple(compiled.positiontup or ()), defaults)

    def arguments(self, parameters: Mapping[str, Any]) -> list[Any]:
        try:
            return [
                parameters[name] if name in parameters else self.defaults[name]
                for name in self.names
            ]
        except KeyError as missing:
            raise sa_exc.ArgumentError(
                f"a value is required for bound parameter {missing.args[0]!r}"
            ) from None


#: Statements already rendered for lanes, kept as long as the statement lives (a
#: work's module-level `text()` constants: rendered once per process).
_LANE_STATEMENTS: weakref.WeakKeyDictionary[TextClause, _LaneStatement] = (
    weakref.WeakKeyDictionary()
)


class LaneConnection:
    """What a unit of work on a lane executes on: the asyncpg connection under the lane's
    pooled SQLAlchemy connection, inside the unit's own transaction.

    NOTE: SQLAlchemy's execution path (a greenlet switch, an execution context and a
    result per statement) costs more CPU than the statement's round trips; this sends
    the statement SQLAlchemy itself rendered for asyncpg, through the same unnamed
    statement (the engine's caches are off), after the same session-state check.
    """

    __slots__ = ("_dialect", "_raw")

    def __init__(self, raw: asyncpg.Connection, dialect: Dialect) -> None:
        self._raw = raw
        self._dialect = dialect

    async def execute(
        self, statement: TextClause, parameters: Mapping[str, Any] | None = None
    ) -> LaneResult:
        """Run a `text()` statement with `:name` parameters; its rows (possibly none)."""
        if not isinstance(statement, TextClause):
            raise TypeError("a lane runs text() statements")
        prepared = _LANE_STATEMENTS.get(statement)
        if prepared is None:
            prepared = _LANE_STATEMENTS[statement] = _LaneStatement.of(statement, self._dialect)
        rows = await self._raw.fetch(
            prepared.sql, *prepared.arguments(parameters or {}), record_class=LaneRow
        )
        return LaneResult(rows)

    @property
    def closed(self) -> bool:
        """Whether the connection is known to be closed (its peer hung up)."""
        return bool(self._raw.is_closed())

    def terminate(self) -> None:
        """Close the connection now, whatever it is doing (asyncpg's `terminate`)."""
        self._raw.terminate()

    async def begin(self, inline: Mapping[str, str]) -> None:
        """`BEGIN` and the settings in `inline` (the project's own values, written into
        the statement), one round trip."""
        await self._raw.execute(_begin_sql(tuple(inline.items())))

    async def commit(self) -> None:
        """`COMMIT`; raises if the server rolled the transaction back instead."""
        status = await self._raw.execute("COMMIT")
        if status != "COMMIT":
            raise sa_exc.InvalidRequestError(
                f"the transaction was rolled back at commit ({status}): a statement in it "
                "failed and the error was caught"
            )

    async def set_local(self, arguments: Sequence[str]) -> None:
        """`set_config(name, value, true)` for `name, value, ...` pairs, one round trip."""
        if not arguments:
            return  # as `set_local`: nothing to set is no statement (`SELECT ` alone is not SQL)
        await self._raw.execute(_set_config_sql(len(arguments) // 2), *arguments)


#: What a unit of work hands its caller: a session, or on a lane its connection; all
#: three `execute()` Core `text()` statements and their results read alike.
Executor = AsyncSession | AsyncConnection | LaneConnection


class _Lane:
    """One pooled connection that a lane of units of work reuses, one after another.

    NOTE: through the transaction pooler a client connection holds a server connection
    only during a transaction, so keeping it between transactions costs the server
    nothing; it saves the pool checkout and its pre-ping (several round trips) per unit.
    Any failure discards the connection: the next unit starts on a fresh one.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.connection: AsyncConnection | None = None
        self.executor: LaneConnection | None = None

    async def connect(self) -> LaneConnection:
        """The lane's connection (checked out, pre-pinged, on first use or after a discard),
        as what its units execute on."""
        if self.executor is not None and self.executor.closed:
            await self.discard()  # the pooler closed it between two units
        if self.executor is None:
            self.connection = await self.engine.connect()
            try:
                raw = (await self.connection.get_raw_connection()).driver_connection
                if raw is None:
                    raise sa_exc.InvalidRequestError("a lane's connection has no driver connection")
            except BaseException:
                await self.discard()
                raise
            self.executor = LaneConnection(raw, self.engine.dialect)
        return self.executor

    async def discard(self) -> None:
        connection, self.connection = self.connection, None
        executor, self.executor = self.executor, None
        if executor is not None:
            # NOTE: first the asyncpg connection itself, at once: SQLAlchemy's invalidation
            # closes it gracefully, which fails on a connection still busy with a broken
            # operation (a server connection lost mid-statement) and would leave it alive,
            # for the pool to hand to another lane.
            executor.terminate()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()
            with contextlib.suppress(Exception):
                await connection.close()


_LANE: ContextVar[_Lane | None] = ContextVar("tenantflow_db_lane", default=None)
#: Connections lanes left for the next lanes, within `lane_connections()`.
_SPARES: ContextVar[list[_Lane] | None] = ContextVar("tenantflow_db_lane_spares", default=None)


@asynccontextmanager
async def lane_connections() -> AsyncIterator[None]:
    """Lanes that end within this block leave their connection to the next lane instead
    of giving it back to the pool; those left over go back when the block ends.

    NOTE: a sweep's batches run more lanes at once (two batches in flight) than the
    engine's pool keeps (`DB_POOL_SIZE`): the pool closes every connection beyond it when
    it comes back, so each batch logged in again through the pooler, several logins per
    batch. Through the transaction pooler a client connection between transactions holds
    no server connection, and a lane checks its connection before each unit as it does
    between its own units.
    """
    spares: list[_Lane] = []
    token = _SPARES.set(spares)
    try:
        yield
    finally:
        _SPARES.reset(token)
        while spares:
            spare = spares.pop()
            if spare.connection is not None:
                with contextlib.suppress(Exception):
                    await spare.connection.close()


@asynccontextmanager
async def connection_lane(settings: Settings | None = None) -> AsyncIterator[None]:
    """Units of work in this task reuse one pooled connection, each its own transaction.

    For a lane of tenant transactions run one after another (`tenantflow.batches`); the
    claims and role of each stay `SET LOCAL`, inside its own transaction. Within
    `lane_connections()` it starts on a connection an earlier lane left, if any.
    """
    engine = await transaction_engine(settings)
    spares = _SPARES.get()
    mine = [spare for spare in spares or () if spare.engine is engine]
    lane = mine[0] if mine else _Lane(engine)
    if mine and spares is not None:
        spares.remove(lane)
    token = _LANE.set(lane)
    try:
        yield
    finally:
        _LANE.reset(token)
        if spares is not None and lane.executor is not None and not lane.executor.closed:
            spares.append(lane)
        elif lane.connection is not None:
            with contextlib.suppress(Exception):
                await lane.connection.close()


@asynccontextmanager
async def _on_lane(
    lane: _Lane, values: Mapping[str, str], inline: Collection[str]
) -> AsyncIterator[Executor]:
    # NOTE: no ORM session and no SQLAlchemy execution per statement: a lane runs
    # thousands of units of work, and that machinery costs more CPU than the statements
    # it sends. The transaction is BEGIN ... COMMIT on the pooled connection; BEGIN
    # carries the settings that are the project's own values (timeout, role, service
    # claims) in the same round trip, and anything else (a user's claims) follows as
    # bound parameters, before the caller's first statement: three round trips for a
    # service unit with one statement, where BEGIN, settings, statement, COMMIT take four.
    executor = await lane.connect()
    try:
        await executor.begin({k: v for k, v in values.items() if k in inline})
        await executor.set_local(
            _set_config_arguments({k: v for k, v in values.items() if k not in inline})
        )
        yield executor
        await executor.commit()
    except BaseException:
        # NOTE: the connection goes, and with it the transaction if still open: the next
        # unit of the lane starts on a fresh connection, never on one in doubt.
        await lane.discard()
        raise


@asynccontextmanager
async def unit_of_work(
    *,
    local_settings: Mapping[str, str] | None = None,
    role: str | None = None,
    settings: Settings | None = None,
    constant_settings: bool = False,
) -> AsyncIterator[Executor]:
    """A transaction on the transaction pooler with transaction-local settings applied.

    Args:
        local_settings: values set with `set_config(..., true)` before the caller's
            first statement (e.g. `request.jwt.claims`); they vanish at commit/rollback.
        role: a role switched to with `SET LOCAL ROLE` (e.g. `authenticated`), so
            row-level security applies for the rest of the transaction.
        settings: override the process settings (tests).
        constant_settings: `local_settings` are the project's own constants (the
            service claims), not anybody's data: on a lane they are written into the
            `BEGIN` statement, saving a round trip. Otherwise (a user's claims) they are
            always bound parameters, so they never appear in a statement's text (the
            server's log, `pg_stat_activity`).
    """
    settings = settings or get_settings()
    engine = await transaction_engine(settings)
    values = {"statement_timeout": str(settings.db_statement_timeout_ms)}
    values.update(local_settings or {})
    if role is not None:
        if not _ROLE_NAME.match(role):
            raise ValueError(f"not a valid role name: {role!r}")
        # NOTE: set_config('role', r, true) is SET LOCAL ROLE r, in the same round trip.
        values["role"] = role
    lane = _LANE.get()
    if lane is not None and lane.engine is engine:
        inline = {"statement_timeout", "role"}
        if constant_settings:
            inline.update(local_settings or {})
        async with _on_lane(lane, values, inline) as session:
            yield session
        return
    async with session_scope(engine) as session:
        await set_local(session, values)
        yield session
