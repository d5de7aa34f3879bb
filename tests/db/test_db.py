"""The session pattern, transaction-local settings and engines per event loop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import asyncpg
import pytest
from prefect import flow, task
from sqlalchemy import text
from sqlalchemy.exc import MultipleResultsFound, NoResultFound
from sqlalchemy.pool import QueuePool

from tenantflow.db import (
    Executor,
    LaneConnection,
    SessionStateError,
    connection_lane,
    dispose_engines,
    is_transient_database_error,
    lane_connections,
    session_scope,
    transaction_engine,
    unit_of_work,
)
from tenantflow.settings import Settings, load_settings
from tenantflow_dev import Stack
from tenantflow_dev.config import WORKER_DB_ROLE

pytestmark = pytest.mark.stack


def _database(stack: Stack) -> Iterator[str]:
    name = f"tf_scratch_{uuid.uuid4().hex[:8]}"
    parts = stack.config.connect_parts(stack.config.pg_port, admin=True)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(**parts)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    # NOTE: owned by the workers' role, so the layer's tests (which create tables) can
    # log in as the workers do; the role owns nothing in the stack's own database.
    asyncio.run(admin(f'CREATE DATABASE "{name}" OWNER {WORKER_DB_ROLE}'))

    async def open_public_schema() -> None:
        # NOTE: the role is NOINHERIT, so pg_database_owner's rights on `public` do not
        # reach it; grant them directly.
        conn = await asyncpg.connect(**{**parts, "database": name})
        try:
            await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {WORKER_DB_ROLE}")
        finally:
            await conn.close()

    asyncio.run(open_public_schema())
    yield name
    asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def scratch_database(stack: Stack) -> Iterator[str]:
    """A database of its own for tables the tests create."""
    yield from _database(stack)


@pytest.fixture
def counted_database(stack: Stack) -> Iterator[str]:
    """A database only one test connects to, so pg_stat_activity counts its connections."""
    yield from _database(stack)


def settings_for(stack: Stack, database: str, port: int | None = None) -> Settings:
    config = stack.config
    url = config.url(
        port or config.transaction_pooler_port,
        user=WORKER_DB_ROLE,
        password=config.secrets.worker_password,
    )
    return load_settings(database_url=url.rsplit("/", 1)[0] + f"/{database}")


@pytest.fixture
async def probe_table(stack: Stack, scratch_database: str) -> AsyncIterator[Settings]:
    settings = settings_for(stack, scratch_database)
    async with unit_of_work(settings=settings) as session:
        await session.execute(text("CREATE TABLE IF NOT EXISTS probe (id int PRIMARY KEY)"))
        await session.execute(text("TRUNCATE probe"))
    yield settings
    await dispose_engines()


async def _probe_ids(settings: Settings) -> list[int]:
    async with unit_of_work(settings=settings) as session:
        return list((await session.execute(text("SELECT id FROM probe ORDER BY id"))).scalars())


async def test_success_commits(probe_table: Settings) -> None:
    async with unit_of_work(settings=probe_table) as session:
        await session.execute(text("INSERT INTO probe VALUES (1), (2)"))
    assert await _probe_ids(probe_table) == [1, 2]


async def test_an_exception_rolls_back_and_writes_nothing(probe_table: Settings) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with unit_of_work(settings=probe_table) as session:
            await session.execute(text("INSERT INTO probe VALUES (10)"))
            await session.execute(text("INSERT INTO probe VALUES (11)"))
            raise Boom
    assert await _probe_ids(probe_table) == []


async def test_cancellation_rolls_back_too(probe_table: Settings) -> None:
    started = asyncio.Event()

    async def slow_writer() -> None:
        async with unit_of_work(settings=probe_table) as session:
            await session.execute(text("INSERT INTO probe VALUES (20)"))
            started.set()
            await asyncio.sleep(30)

    writer = asyncio.create_task(slow_writer())
    await started.wait()
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert await _probe_ids(probe_table) == []


async def test_session_scope_closes_the_session(probe_table: Settings) -> None:
    engine = await transaction_engine(probe_table)
    async with session_scope(engine) as session:
        await session.execute(text("SELECT 1"))
    assert not session.in_transaction()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_transaction_local_setting_is_never_seen_by_another_unit(stack: Stack) -> None:
    async def writer(n: int) -> str | None:
        own = f"writer-{n}-{uuid.uuid4()}"
        async with unit_of_work(local_settings={"tenantflow.probe": own}) as session:
            await asyncio.sleep(0.01)
            seen = (
                await session.execute(text("SELECT current_setting('tenantflow.probe', true)"))
            ).scalar_one()
        return None if seen == own else f"writer {n} saw {seen!r}"

    async def reader(n: int) -> str | None:
        async with unit_of_work() as session:
            seen = (
                await session.execute(text("SELECT current_setting('tenantflow.probe', true)"))
            ).scalar_one()
        # NOTE: once a custom setting was used on a server connection it reads '' not NULL.
        return None if seen in (None, "") else f"reader {n} saw {seen!r}"

    for _ in range(3):
        results = await asyncio.gather(
            *(writer(n) for n in range(40)), *(reader(n) for n in range(40))
        )
        assert [r for r in results if r] == []
    await dispose_engines()


@pytest.mark.parametrize(
    "statement",
    [
        "SET statement_timeout = 0",
        "set search_path to public",
        "SET SESSION ROLE authenticated",
        "RESET ALL",
        "DISCARD ALL",
        "SELECT set_config('request.jwt.claims', '{}', false)",
        "SELECT pg_advisory_lock(42)",
        "select pg_try_advisory_lock_shared(42)",
        "LISTEN tenantflow",
        "PREPARE q AS SELECT 1",
    ],
)
async def test_session_level_state_is_refused(stack: Stack, statement: str) -> None:
    with pytest.raises(SessionStateError, match="transaction pooler"):
        async with unit_of_work() as session:
            await session.execute(text(statement))
    await dispose_engines()


async def test_transaction_local_forms_are_allowed(stack: Stack) -> None:
    async with unit_of_work(role="authenticated") as session:
        await session.execute(text("SET LOCAL statement_timeout = 5000"))
        await session.execute(text("SELECT pg_advisory_xact_lock(42)"))
        await session.execute(text("SELECT set_config('tenantflow.x', 'y', true)"))
        role = (await session.execute(text("SELECT current_user"))).scalar_one()
        timeout = (await session.execute(text("SHOW statement_timeout"))).scalar_one()
    assert (role, timeout) == ("authenticated", "5s")
    async with unit_of_work() as session:
        assert (await session.execute(text("SELECT current_user"))).scalar_one() == WORKER_DB_ROLE
    await dispose_engines()


async def test_statement_timeout_is_applied_per_transaction(stack: Stack) -> None:
    settings = load_settings(db_statement_timeout_ms=1234)
    async with unit_of_work(settings=settings) as session:
        assert (await session.execute(text("SHOW statement_timeout"))).scalar_one() == "1234ms"
    await dispose_engines()


@pytest.mark.parametrize("bad", ["x; drop table y", "Robert'); --", "1abc"])
async def test_setting_and_role_names_are_validated(stack: Stack, bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid"):
        async with unit_of_work(local_settings={bad: "1"}):
            pass
    with pytest.raises(ValueError, match="not a valid role"):
        async with unit_of_work(role=bad):
            pass
    await dispose_engines()


async def test_engines_are_kept_per_event_loop(stack: Stack) -> None:
    here = await transaction_engine()
    assert await transaction_engine() is here

    async def other_loop_engine() -> int:
        return id(await transaction_engine())

    elsewhere = await asyncio.to_thread(asyncio.run, other_loop_engine())
    assert elsewhere != id(here)
    assert await dispose_engines() == 1


async def _client_connections(stack: Stack, database: str) -> int:
    conn = await asyncpg.connect(**stack.config.connect_parts(stack.config.pg_port, admin=True))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database
        )
    finally:
        await conn.close()
    return count


@pytest.mark.slow
def test_mapped_prefect_tasks_share_the_layer_across_loops(
    stack: Stack, counted_database: str
) -> None:
    """50 mapped async tasks (each on its own event loop in Prefect's thread pool)."""
    # NOTE: the direct port, so every connection the project opens is visible in
    # pg_stat_activity of its own database; PgBouncer would hide them behind its pool.
    settings = settings_for(stack, counted_database, port=stack.config.pg_port)

    @task(persist_result=False)
    async def square(n: int) -> int:
        async with unit_of_work(settings=settings) as session:
            value = (
                await session.execute(text("SELECT CAST(:n AS int) * CAST(:n AS int)"), {"n": n})
            ).scalar_one()
            await asyncio.sleep(0.01)
        return int(value)

    @flow(persist_result=False)
    def mapped() -> list[int]:
        return cast("list[int]", square.map(list(range(50))).result())

    assert mapped() == [n * n for n in range(50)]
    # Every task's loop has closed, and each engine was disposed with it.
    assert asyncio.run(_client_connections(stack, counted_database)) == 0


# --------------------------------------------------------------------------- lanes


async def test_a_lane_reads_rows_as_sqlalchemy_does(probe_table: Settings) -> None:
    async with connection_lane(probe_table), unit_of_work(settings=probe_table) as session:
        assert isinstance(session, LaneConnection)
        await session.execute(text("INSERT INTO probe VALUES (1), (2)"))
        row = (await session.execute(text("SELECT CAST(:n AS int) AS n, 'x' AS s"), {"n": 7})).one()
        assert (row.n, row["s"], row[0], tuple(row)) == (7, "x", 7, (7, "x"))
        ids = await session.execute(text("SELECT id FROM probe ORDER BY id"))
        assert [r.id for r in ids] == [1, 2]
        none = text("SELECT id FROM probe WHERE id > :n")
        assert (await session.execute(none, {"n": 5})).one_or_none() is None
        assert (await session.execute(none, {"n": 5})).scalar() is None
        with pytest.raises(NoResultFound):
            (await session.execute(none, {"n": 5})).one()
        with pytest.raises(MultipleResultsFound):
            (await session.execute(none, {"n": 0})).one()
        assert (await session.execute(none, {"n": 1})).scalar_one() == 2
    assert await _probe_ids(probe_table) == [1, 2]


@pytest.mark.parametrize(
    "statement", ["SET search_path TO x", "SELECT set_config('a.b', 'c', false)"]
)
async def test_a_lane_refuses_session_level_state_too(
    probe_table: Settings, statement: str
) -> None:
    with pytest.raises(SessionStateError):
        async with connection_lane(probe_table), unit_of_work(settings=probe_table) as session:
            await session.execute(text(statement))


async def test_a_lane_failure_rolls_back_its_unit_only(probe_table: Settings) -> None:
    class Boom(Exception):
        pass

    async with connection_lane(probe_table):
        async with unit_of_work(settings=probe_table) as session:
            await session.execute(text("INSERT INTO probe VALUES (1)"))
        with pytest.raises(Boom):
            async with unit_of_work(settings=probe_table) as session:
                await session.execute(text("INSERT INTO probe VALUES (2)"))
                raise Boom
        async with unit_of_work(settings=probe_table) as session:
            await session.execute(text("INSERT INTO probe VALUES (3)"))
    assert await _probe_ids(probe_table) == [1, 3]


async def test_a_server_connection_killed_mid_unit_writes_nothing_and_the_lane_goes_on(
    stack: Stack, probe_table: Settings
) -> None:
    """The pooler's server connection of a unit terminated before its commit: that unit
    fails with an error the per-client retries take as transient and writes nothing; the
    lane's next unit runs on a fresh connection; the retried unit writes once."""
    admin = await asyncpg.connect(**stack.config.connect_parts(stack.config.pg_port, admin=True))
    try:
        async with connection_lane(probe_table):
            async with unit_of_work(settings=probe_table) as session:
                await session.execute(text("INSERT INTO probe VALUES (1)"))
            with pytest.raises(Exception) as caught:
                async with unit_of_work(settings=probe_table) as session:
                    await session.execute(text("INSERT INTO probe VALUES (2)"))
                    pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                    assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
                    await session.execute(text("INSERT INTO probe VALUES (3)"))
            assert is_transient_database_error(caught.value), repr(caught.value)
            for attempt in range(50):  # the pooler may need a moment to replace it
                try:
                    async with unit_of_work(settings=probe_table) as session:
                        await session.execute(text("INSERT INTO probe VALUES (2), (3)"))
                    break
                except Exception as error:
                    assert is_transient_database_error(error) and attempt < 49, repr(error)
                    await asyncio.sleep(0.1)
            async with unit_of_work(settings=probe_table) as session:
                await session.execute(text("INSERT INTO probe VALUES (4)"))
    finally:
        await admin.close()
    assert await _probe_ids(probe_table) == [1, 2, 3, 4]


#: Values a setting may hold that a statement's text must not mangle.
_AWKWARD = "it's \\'; SELECT 1; -- \\x27 \u00e9\u4e2d"


@pytest.mark.parametrize("constant", [True, False])
async def test_a_lane_sets_the_units_values_exactly_in_three_round_trips_when_constant(
    probe_table: Settings, constant: bool
) -> None:
    """A unit on a lane: its settings arrive exactly (quotes, backslashes, SQL, unicode);
    the project's constants ride in the `BEGIN` statement (BEGIN, statement, COMMIT:
    three round trips), anything else is a bound parameter that no statement's text
    holds."""
    sent: list[tuple[str, tuple[object, ...]]] = []
    local = {"request.jwt.claims": _AWKWARD, "tenantflow.probe": "x"}

    def unit() -> AbstractAsyncContextManager[Executor]:
        return unit_of_work(
            local_settings=local,
            role=WORKER_DB_ROLE,
            settings=probe_table,
            constant_settings=constant,
        )

    async with connection_lane(probe_table):
        async with unit() as session:
            assert isinstance(session, LaneConnection)
            raw = session._raw  # what the lane sends is the point
            raw.add_query_logger(lambda record: sent.append((record.query, record.args)))
            row = (
                await session.execute(
                    text(
                        "SELECT current_setting('request.jwt.claims') AS claims, "
                        "current_setting('tenantflow.probe') AS probe, current_user AS role, "
                        "(SELECT setting FROM pg_settings WHERE name = 'statement_timeout') "
                        "AS timeout"
                    )
                )
            ).one()
        assert (row.claims, row.probe, row.role) == (_AWKWARD, "x", WORKER_DB_ROLE)
        assert row.timeout == str(probe_table.db_statement_timeout_ms)
        await asyncio.sleep(0.01)  # asyncpg calls query loggers soon after, not at once
        sent.clear()
        async with unit() as session:
            await session.execute(text("INSERT INTO probe VALUES (1)"))
        await asyncio.sleep(0.01)
    statements = [query for query, _ in sent]
    assert statements[0].startswith("BEGIN; SELECT set_config(")
    assert statements[-2:] == ["INSERT INTO probe VALUES (1)", "COMMIT"]
    if constant:
        assert len(statements) == 3
    else:
        assert len(statements) == 4
        assert all(_AWKWARD not in query for query in statements)
        assert _AWKWARD in sent[1][1]
    assert await _probe_ids(probe_table) == [1]


async def test_a_lane_unit_that_swallowed_a_failed_statement_fails_at_commit(
    probe_table: Settings,
) -> None:
    """PostgreSQL answers COMMIT of an aborted transaction with a rollback, not an error:
    the unit fails instead of passing as committed, and wrote nothing."""
    async with connection_lane(probe_table):
        with pytest.raises(Exception, match="rolled back at commit"):
            async with unit_of_work(settings=probe_table) as session:
                await session.execute(text("INSERT INTO probe VALUES (1)"))
                with pytest.raises(asyncpg.UniqueViolationError):
                    await session.execute(text("INSERT INTO probe VALUES (1)"))
        async with unit_of_work(settings=probe_table) as session:
            await session.execute(text("INSERT INTO probe VALUES (2)"))
    assert await _probe_ids(probe_table) == [2]


def _checked_out(engine: Any) -> int:
    """Connections of the engine's queue pool out of it now."""
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


async def test_lanes_within_a_sweep_hand_their_connection_on_and_never_a_closed_one(
    probe_table: Settings,
) -> None:
    """Within `lane_connections()` a lane that ends leaves its connection to the next, the
    pool's overflow ones too (the pool would close those); one that closed meanwhile is
    dropped, not handed on; what is left goes back to the pool."""
    await dispose_engines()
    small = probe_table.model_copy(update={"db_pool_size": 1, "db_max_overflow": 5})
    raws: list[Any] = []

    async def lane(n: int, together: asyncio.Barrier) -> None:
        async with connection_lane(small), unit_of_work(settings=small) as session:
            assert isinstance(session, LaneConnection)
            raws.append(session._raw)  # which connection the lane runs on is the point
            await session.execute(text("INSERT INTO probe VALUES (:n)"), {"n": n})
            await together.wait()  # both lanes hold a connection at once

    async def two_lanes(first: int) -> list[Any]:
        together = asyncio.Barrier(2)
        await asyncio.gather(lane(first, together), lane(first + 1, together))
        return raws[-2:]

    async with lane_connections():
        opened = await two_lanes(1)  # one pooled connection, one of the pool's overflow
        assert opened[0] is not opened[1]
        assert {id(raw) for raw in await two_lanes(3)} == {id(raw) for raw in opened}
        opened[0].terminate()
        again = await two_lanes(5)
        assert opened[0] not in again and opened[1] in again
        assert _checked_out(await transaction_engine(small)) == 2
    assert _checked_out(await transaction_engine(small)) == 0
    assert await _probe_ids(probe_table) == [1, 2, 3, 4, 5, 6]


async def test_a_lane_leaves_no_named_prepared_statement(probe_table: Settings) -> None:
    statement = text("SELECT count(*) FROM pg_prepared_statements WHERE CAST(:n AS int) > 0")
    counts = []
    async with connection_lane(probe_table):
        for n in range(1, 201):
            async with unit_of_work(settings=probe_table) as session:
                await session.execute(text("INSERT INTO probe VALUES (:n)"), {"n": n})
                counts.append((await session.execute(statement, {"n": n})).scalar_one())
    assert set(counts) == {0}
    assert len(await _probe_ids(probe_table)) == 200
