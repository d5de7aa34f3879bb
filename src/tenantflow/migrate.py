"""Schema migrations: through the session pooler, one at a time, all or nothing.

The `migrate` flow (`flows/migrate.py`) and `tenantflow migrate` call
`run_migration()`. What it guarantees:

* **Session pooler only.** `MIGRATION_DATABASE_URL` is checked again here, before any
  connection, with the rule settings validation applies
  (`tenantflow.settings.migration_endpoint_refusal`): port 6543, a Supabase pooler port
  other than 5432, and the host:port of `DATABASE_URL` (the transaction pooler by
  definition) are refused. A `Settings` built with `model_copy(update=...)` or
  `model_construct()` skips validation; this check does not.
* **One migration at a time.** A session-level advisory lock (`pg_try_advisory_lock`,
  polled until `migration_lock_timeout_s`) is held on the very connection Alembic
  migrates with, for the whole run. A second run waits, then fails with "another
  migration is running". Session-level locks are only sound through the session
  pooler, which is one more reason for the check above.
* **All or nothing.** The whole upgrade runs in one transaction (PostgreSQL has
  transactional DDL): a failure leaves the database at the revision it started from.
* **Dry run** renders the SQL with Alembic's offline mode (no connection, no
  credentials) from the database's current revision; it takes no lock and changes
  nothing. It reads the current revision, read-only, so the SQL is what a real run
  would execute.
* **Downgrade only to an explicit target**: `downgrade_to` is a revision id or
  `base`; relative forms such as `-1` are refused, so a retried or repeated run can
  never walk the schema down further than asked.
* **Nothing to do** returns as soon as the current revision is known (under the lock,
  so a run that waited behind another sees that run's result).

Migrations and the session pooler: docs/connections.md.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tenantflow.db import build_migration_engine
from tenantflow.errors import TenantflowError
from tenantflow.settings import (
    Settings,
    endpoint_of,
    get_settings,
    migration_endpoint_refusal,
)

__all__ = [
    "ALEMBIC_INI",
    "MIGRATION_LOCK_KEY",
    "MigrationError",
    "MigrationLockTimeout",
    "MigrationRefused",
    "MigrationResult",
    "MigrationStep",
    "alembic_config",
    "check_session_pooler",
    "current_revision",
    "locked_migration_connection",
    "render_sql",
    "run_migration",
    "script_directory",
]

log = logging.getLogger("tenantflow.migrate")

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]
Action = Literal["upgrade", "downgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
ALEMBIC_INI = MIGRATIONS_DIR / "alembic.ini"

#: Key of the session-level advisory lock (the bytes "tfmigrat"). Advisory locks are per
#: database, so migrations of different databases never wait for each other.
MIGRATION_LOCK_KEY = int.from_bytes(b"tfmigrat", "big")
_LOCK_POLL_S = 0.5
_LOCK_WAIT_INFO = "tenantflow.migration_lock_wait_s"
_EXPLICIT_REVISION = re.compile(r"^[A-Za-z0-9_]+$")
_HEAD = frozenset({"head", "heads"})
_BASE = "base"

# NOTE: Alembic keeps the running migration context in module globals (`alembic.op`,
# `alembic.context`). Two runs awaited concurrently on one event loop would otherwise
# interleave inside them; runs in separate processes (workers) are serialised by the
# advisory lock instead.
_ALEMBIC_GUARDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


class MigrationError(TenantflowError, RuntimeError):
    """A migration could not run. The message names no secret."""


class MigrationRefused(MigrationError):
    """Refused before changing anything: wrong endpoint, unknown or relative revision."""


class MigrationLockTimeout(MigrationError):
    """Another migration held the lock for longer than the configured timeout."""


@dataclass(frozen=True)
class MigrationStep:
    """One revision that was (or, in a dry run, would be) applied or reverted."""

    revision: str
    message: str

    def __str__(self) -> str:
        return f"{self.revision} ({self.message})"


@dataclass(frozen=True)
class MigrationResult:
    """What a run did. `after` is the database's revision once the run ended; in a dry
    run it equals `before` and `target` is where a real run would have gone."""

    action: Action
    dry_run: bool
    before: str | None
    after: str | None
    target: str | None
    steps: tuple[MigrationStep, ...]
    sql: str = ""
    seconds: float = 0.0
    lock_wait_seconds: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        return not self.steps

    def summary(self) -> str:
        """One line for logs and the CLI."""
        before, target = _label(self.before), _label(self.target)
        if self.nothing_to_do:
            return f"nothing to do: the database is already at {before}"
        verb = "downgrade" if self.action == "downgrade" else "upgrade"
        count = f"{len(self.steps)} revision{'s' if len(self.steps) != 1 else ''}"
        if self.dry_run:
            return f"dry run: would {verb} {before} -> {target} ({count}); nothing changed"
        return f"{verb}d {before} -> {_label(self.after)} ({count}) in {self.seconds:.2f}s"

    def to_markdown(self) -> str:
        """The run's report, for a Prefect markdown artifact."""
        title = "Migration dry run" if self.dry_run else f"Migration ({self.action})"
        lines = [
            f"# {title}",
            "",
            f"**{self.summary()}**",
            "",
            "| | revision |",
            "|---|---|",
            f"| before | `{_label(self.before)}` |",
            f"| {'target' if self.dry_run else 'after'} | "
            f"`{_label(self.target if self.dry_run else self.after)}` |",
            "",
        ]
        if self.steps:
            lines += ["## Revisions", ""]
            lines += [f"1. `{step.revision}` {step.message}" for step in self.steps]
            lines.append("")
        if not self.dry_run:
            lines.append(
                f"Took {self.seconds:.2f}s, of which {self.lock_wait_seconds:.2f}s waiting "
                "for the migration lock."
            )
        if self.dry_run and self.sql:
            lines += ["## SQL", "", "```sql", self.sql.strip(), "```"]
        return "\n".join(lines) + "\n"


def _label(revision: str | None) -> str:
    return revision or _BASE


def alembic_config(
    *, connection: Connection | None = None, output_buffer: io.StringIO | None = None
) -> Config:
    """Alembic's Config, from the `alembic.ini` shipped inside the package.

    Args:
        connection: an open connection `env.py` migrates on (and never closes).
        output_buffer: where offline mode writes its SQL.
    """
    config = Config(ALEMBIC_INI, output_buffer=output_buffer)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    """The package's revisions."""
    return ScriptDirectory.from_config(alembic_config())


def check_session_pooler(settings: Settings) -> None:
    """Refuse a migration URL that is, or may be, the transaction pooler.

    The rule is `tenantflow.settings.migration_endpoint_refusal`; it is checked again here
    because settings built with `model_copy` or `model_construct` skip validation.

    Raises:
        MigrationRefused: before any connection is attempted.
    """
    migration = make_url(settings.migration_url().get_secret_value())
    refusal = migration_endpoint_refusal(
        migration, make_url(settings.database_url.get_secret_value())
    )
    if refusal:
        raise MigrationRefused(
            f"refusing to migrate through {endpoint_of(migration)}: {refusal}; set "
            "MIGRATION_DATABASE_URL to the session pooler"
        )


def _alembic_guard() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    guard = _ALEMBIC_GUARDS.get(loop)
    if guard is None:
        guard = _ALEMBIC_GUARDS[loop] = asyncio.Lock()
    return guard


def current_revision(connection: Connection) -> str | None:
    """The database's revision (None: base), read from Alembic's version table."""
    heads = MigrationContext.configure(connection).get_current_heads()
    if len(heads) > 1:
        raise MigrationError(f"the database has several current revisions: {sorted(heads)}")
    return heads[0] if heads else None


async def _try_lock(connection: AsyncConnection) -> bool:
    acquired = await connection.scalar(
        text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
    )
    # NOTE: the lock is session-level, so it outlives this commit; the commit leaves the
    # connection outside a transaction for Alembic to begin its own.
    await connection.commit()
    return bool(acquired)


async def _acquire_lock(connection: AsyncConnection, timeout_s: float, logger: Logger) -> float:
    started = time.monotonic()
    deadline = started + timeout_s
    if await _try_lock(connection):
        return 0.0
    logger.info(
        "another migration is running; waiting up to %.0fs for the migration lock", timeout_s
    )
    while time.monotonic() < deadline:
        await asyncio.sleep(min(_LOCK_POLL_S, max(0.0, deadline - time.monotonic())))
        if await _try_lock(connection):
            waited = time.monotonic() - started
            logger.info("got the migration lock after %.1fs", waited)
            return waited
    raise MigrationLockTimeout(
        f"another migration is running: the migration lock was not free within "
        f"{timeout_s:.0f}s (migration_lock_timeout_s); nothing was changed, try again "
        "when it has finished"
    )


async def _release_lock(connection: AsyncConnection, logger: Logger) -> None:
    try:
        if connection.in_transaction():
            await connection.rollback()
        await connection.execute(
            text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY}
        )
        await connection.commit()
    except (SQLAlchemyError, OSError) as error:
        # NOTE: closing the connection releases the lock too (PgBouncer resets a server
        # connection with DISCARD ALL before another client gets it).
        logger.warning("could not release the migration lock (%s)", type(error).__name__)


@asynccontextmanager
async def locked_migration_connection(
    settings: Settings,
    *,
    lock_timeout_s: float | None = None,
    logger: Logger | None = None,
) -> AsyncIterator[AsyncConnection]:
    """A session-pooler connection that holds the migration lock until it is closed.

    Raises:
        MigrationRefused: the URL is, or may be, the transaction pooler.
        MigrationLockTimeout: another migration held the lock for too long.
    """
    logger = logger or log
    check_session_pooler(settings)
    timeout_s = settings.migration_lock_timeout_s if lock_timeout_s is None else lock_timeout_s
    engine = build_migration_engine(settings)
    try:
        connection = await _connect(engine)
        try:
            connection.info[_LOCK_WAIT_INFO] = await _acquire_lock(connection, timeout_s, logger)
            try:
                yield connection
            finally:
                await _release_lock(connection, logger)
        finally:
            await connection.close()
    finally:
        await engine.dispose()


async def _connect(engine: AsyncEngine) -> AsyncConnection:
    try:
        return await engine.connect()
    except (DBAPIError, OSError, TimeoutError) as error:
        # NOTE: the driver's message names host, port and user, never the password.
        reason = error.orig if isinstance(error, DBAPIError) else error
        url = engine.url
        raise MigrationError(
            f"could not connect to the session pooler at {endpoint_of(url)}/"
            f"{url.database} as {url.username}: {reason}"
        ) from None


def _resolve(script: ScriptDirectory, revision: str, what: str) -> str:
    if not _EXPLICIT_REVISION.match(revision):
        raise MigrationRefused(
            f"{what} must be an explicit revision id (or 'head' / 'base'), not {revision!r}: "
            "relative revisions such as '-1' or '+1' are not accepted"
        )
    try:
        found = script.get_revision(revision)
    except CommandError as error:
        raise MigrationRefused(f"{what}: {error}") from None
    if found is None:
        raise MigrationRefused(f"{what}: no revision {revision!r}")
    return found.revision


def _single_head(script: ScriptDirectory) -> str:
    heads = script.get_heads()
    if len(heads) != 1:
        raise MigrationRefused(
            f"the migrations have {len(heads)} heads ({', '.join(sorted(heads))}); "
            "merge them into one before migrating"
        )
    return heads[0]


def _lineage(script: ScriptDirectory, revision: str | None) -> list[str]:
    """`revision` and every revision below it, top first."""
    if revision is None:
        return []
    return [item.revision for item in script.iterate_revisions(revision, _BASE)]


def _steps(scripts: Iterable[Script]) -> tuple[MigrationStep, ...]:
    return tuple(MigrationStep(item.revision, (item.doc or "").strip()) for item in scripts)


def _check_arguments(revision: str, downgrade_to: str | None) -> None:
    if downgrade_to is not None and revision not in _HEAD:
        raise MigrationRefused(
            "give either `revision` (upgrade) or `downgrade_to` (downgrade), not both"
        )


def _plan(
    script: ScriptDirectory, before: str | None, revision: str, downgrade_to: str | None
) -> tuple[Action, str | None, tuple[MigrationStep, ...]]:
    """Where to go from `before` and through which revisions, in the order they run."""
    if before is not None:
        try:
            script.get_revision(before)
        except CommandError:
            raise MigrationRefused(
                f"the database is at revision {before!r}, which this package does not know "
                "(migrated by a newer version?); refusing to touch it"
            ) from None
    lineage = _lineage(script, before)
    if downgrade_to is None:
        target = (
            _single_head(script) if revision in _HEAD else _resolve(script, revision, "revision")
        )
        if target == before:
            return "upgrade", target, ()
        if target in lineage:
            raise MigrationRefused(
                f"revision {target} is below the database's revision {_label(before)}; "
                "going back needs an explicit `downgrade_to`"
            )
        steps = _steps(reversed(list(script.iterate_revisions(target, before or _BASE))))
        return "upgrade", target, steps
    down: str | None = None
    if downgrade_to != _BASE:
        down = _resolve(script, downgrade_to, "downgrade_to")
    if down == before:
        return "downgrade", down, ()
    if down is not None and down not in lineage:
        raise MigrationRefused(
            f"downgrade_to {down} is not below the database's revision {_label(before)}"
        )
    steps = _steps(script.iterate_revisions(before, down or _BASE))
    return "downgrade", down, steps


def render_sql(action: Action, before: str | None, target: str | None) -> str:
    """The SQL Alembic would run from `before` to `target`, rendered offline.

    No connection and no credentials: Alembic's offline mode (`--sql`). `before` and
    `target` are revision ids, None for the empty database.
    """
    buffer = io.StringIO()
    config = alembic_config(output_buffer=buffer)
    span = f"{_label(before)}:{_label(target)}"
    if action == "upgrade":
        command.upgrade(config, span, sql=True)
    else:
        command.downgrade(config, span, sql=True)
    return buffer.getvalue()


def _apply(connection: Connection, action: Action, target: str | None) -> None:
    config = alembic_config(connection=connection)
    if action == "upgrade":
        command.upgrade(config, _label(target))
    else:
        command.downgrade(config, _label(target))


async def run_migration(
    *,
    revision: str = "head",
    downgrade_to: str | None = None,
    dry_run: bool = False,
    settings: Settings | None = None,
    lock_timeout_s: float | None = None,
    logger: Logger | None = None,
) -> MigrationResult:
    """Upgrade to `revision`, downgrade to `downgrade_to`, or render the SQL (`dry_run`).

    Args:
        revision: `head` or an explicit revision id to upgrade to.
        downgrade_to: an explicit revision id, or `base`, to downgrade to.
        dry_run: render the SQL offline; change nothing and take no lock.
        settings: override the process settings (tests).
        lock_timeout_s: override `migration_lock_timeout_s`.
        logger: where progress goes (the flow passes its run logger).

    Raises:
        MigrationRefused: wrong endpoint or revision; nothing was changed.
        MigrationLockTimeout: another migration is running; nothing was changed.
        MigrationError: the database could not be reached, or a revision failed (its
            transaction was rolled back).
    """
    settings = settings or get_settings()
    logger = logger or log
    started = time.monotonic()
    check_session_pooler(settings)
    _check_arguments(revision, downgrade_to)
    script = script_directory()
    _single_head(script)
    url = make_url(settings.migration_url().get_secret_value())
    where = f"{endpoint_of(url)}/{url.database}"

    if dry_run:
        before = await _read_revision(settings)
        action, target, steps = _plan(script, before, revision, downgrade_to)
        sql = ""
        if steps:
            async with _alembic_guard():
                sql = render_sql(action, before, target)
        result = MigrationResult(
            action, True, before, before, target, steps, sql, time.monotonic() - started
        )
        logger.info("%s", result.summary())
        return result

    async with locked_migration_connection(
        settings, lock_timeout_s=lock_timeout_s, logger=logger
    ) as connection:
        lock_wait: float = connection.info[_LOCK_WAIT_INFO]
        before = await connection.run_sync(current_revision)
        await connection.commit()
        action, target, steps = _plan(script, before, revision, downgrade_to)
        logger.info("database %s is at %s; target %s", where, _label(before), _label(target))
        if steps:
            for step in steps:
                logger.info("%s %s", "applying" if action == "upgrade" else "reverting", step)
            async with _alembic_guard():
                try:
                    await connection.run_sync(_apply, action, target)
                except DBAPIError as error:
                    raise MigrationError(
                        f"{action} to {_label(target)} failed and was rolled back, the database "
                        f"is still at {_label(before)}: {type(error.orig).__name__}: {error.orig}"
                    ) from error
        after = await connection.run_sync(current_revision)
        await connection.commit()
    result = MigrationResult(
        action, False, before, after, target, steps, "", time.monotonic() - started, lock_wait
    )
    logger.info("%s", result.summary())
    return result


async def _read_revision(settings: Settings) -> str | None:
    engine = build_migration_engine(settings)
    try:
        connection = await _connect(engine)
        try:
            return await connection.run_sync(current_revision)
        finally:
            await connection.close()
    finally:
        await engine.dispose()
