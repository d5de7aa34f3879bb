"""Row-level security of the migrated schema, as the guard runs tenant queries.

Each test works in one transaction through the transaction pooler on the stack's own
database (at head) and rolls it back, so no row is left behind, not even in the
append-only audit log. Data is written as `postgres`; then, as a worker does,
`set_config('request.jwt.claims', <claims>, true)` and `SET LOCAL ROLE authenticated`.
(`SET LOCAL ROLE` is checked against the session user, `postgres`, so a test may switch
roles several times in its transaction.)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from tenantflow_dev import Stack

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("main_database_at_head")]


class _Rollback(Exception):
    pass


@dataclass
class World:
    """Clients A (active), B (active), C (suspended), D (active, nobody's)."""

    conn: asyncpg.Connection
    clients: dict[str, uuid.UUID] = field(default_factory=dict)
    users: dict[str, uuid.UUID] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)

    async def act_as(self, role: str, user: str | None = None) -> None:
        claims = {"role": role, "aud": role}
        if user is not None:
            claims["sub"] = str(self.users[user])
        await self.conn.execute(
            "SELECT set_config('request.jwt.claims', $1, true)", json.dumps(claims)
        )
        await self.conn.execute(f"SET LOCAL ROLE {role}")

    async def back_to_postgres(self) -> None:
        await self.conn.execute("SET LOCAL ROLE postgres")

    async def visible_event_clients(self) -> dict[uuid.UUID, int]:
        rows = await self.conn.fetch("SELECT * FROM client_events")  # no WHERE on purpose
        counts: dict[uuid.UUID, int] = {}
        for row in rows:
            counts[row["client_id"]] = counts.get(row["client_id"], 0) + 1
        return counts

    def ours(self, counts: dict[uuid.UUID, int]) -> dict[str, int]:
        names = {value: key for key, value in self.clients.items()}
        return {names[cid]: n for cid, n in counts.items() if cid in names}


async def _build(conn: asyncpg.Connection) -> World:
    world = World(conn)
    for name, status in (("A", "active"), ("B", "active"), ("C", "suspended"), ("D", "active")):
        world.clients[name] = await conn.fetchval(
            "INSERT INTO clients (name, status) VALUES ($1, $2) RETURNING id",
            f"rls-test-{name}",
            status,
        )
        world.events[name] = {"A": 3, "B": 2, "C": 2, "D": 1}[name]
        await conn.execute(
            "INSERT INTO client_events (client_id, occurred_at, kind, amount) "
            "SELECT $1, now(), 'sale', 1 FROM generate_series(1, $2)",
            world.clients[name],
            world.events[name],
        )
        await conn.execute(
            "INSERT INTO client_daily_metrics (client_id, day, events, revenue) "
            "VALUES ($1, current_date, $2::int, $2::int)",
            world.clients[name],
            world.events[name],
        )
    # u: accepted in A, pending in B, accepted in suspended C. p: only pending in A.
    # s: accepted only in suspended C.
    memberships = {
        "u": (("A", "member", True), ("B", "owner", False), ("C", "owner", True)),
        "p": (("A", "admin", False),),
        "s": (("C", "owner", True),),
    }
    for user, rows in memberships.items():
        world.users[user] = uuid.uuid4()
        await conn.execute(
            "INSERT INTO auth.users (id, email, aud, role) "
            "VALUES ($1, $2, 'authenticated', 'authenticated')",
            world.users[user],
            f"rls-{world.users[user].hex}@example.test",
        )
        for client, role, accepted in rows:
            await conn.execute(
                "INSERT INTO memberships (user_id, client_id, role, accepted_at) "
                "VALUES ($1, $2, $3, CASE WHEN $4 THEN now() END)",
                world.users[user],
                world.clients[client],
                role,
                accepted,
            )
    return world


@pytest.fixture
async def world(stack: Stack) -> AsyncIterator[World]:
    conn = await asyncpg.connect(
        **stack.config.connect_parts(stack.config.transaction_pooler_port),
        statement_cache_size=0,
    )
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            yield await _build(conn)
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


async def test_member_sees_only_events_of_accepted_memberships_in_active_clients(
    world: World,
) -> None:
    await world.act_as("authenticated", "u")
    visible = await world.visible_event_clients()
    # Only A: B's membership is pending, C is suspended, D is not theirs, nor any
    # other client in the database.
    assert visible == {world.clients["A"]: world.events["A"]}
    clients = await world.conn.fetch("SELECT id FROM clients")
    assert [row["id"] for row in clients] == [world.clients["A"]]
    metrics = await world.conn.fetch("SELECT client_id FROM client_daily_metrics")
    assert {row["client_id"] for row in metrics} == {world.clients["A"]}
    # Their own membership rows, all of them (pending and suspended too), no one else's.
    own = await world.conn.fetch("SELECT user_id, client_id FROM memberships")
    assert {row["user_id"] for row in own} == {world.users["u"]}
    assert len(own) == 3


async def test_pending_membership_sees_nothing(world: World) -> None:
    await world.act_as("authenticated", "p")
    assert await world.visible_event_clients() == {}
    assert await world.conn.fetch("SELECT * FROM clients") == []
    assert await world.conn.fetch("SELECT * FROM client_daily_metrics") == []


async def test_suspended_client_is_invisible_until_active(world: World) -> None:
    await world.act_as("authenticated", "s")
    assert await world.visible_event_clients() == {}
    await world.back_to_postgres()
    await world.conn.execute(
        "UPDATE clients SET status = 'active' WHERE id = $1", world.clients["C"]
    )
    await world.act_as("authenticated", "s")
    assert await world.visible_event_clients() == {world.clients["C"]: world.events["C"]}


async def test_no_claims_sees_nothing_and_anon_is_refused(world: World) -> None:
    await world.conn.execute("SET LOCAL ROLE authenticated")
    assert await world.visible_event_clients() == {}
    await world.act_as("anon")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with world.conn.transaction():
            await world.conn.fetch("SELECT * FROM client_events")


async def test_service_role_sees_all(world: World) -> None:
    await world.act_as("service_role")
    visible = world.ours(await world.visible_event_clients())
    assert visible == world.events
    clients = {row["id"] for row in await world.conn.fetch("SELECT id FROM clients")}
    assert set(world.clients.values()) <= clients


async def test_membership_helper(world: World) -> None:
    await world.act_as("authenticated", "u")
    check = "SELECT tenantflow_private.is_member($1, $2)"
    a, b, c = (world.clients[name] for name in "ABC")
    assert await world.conn.fetchval(check, a, None)
    assert await world.conn.fetchval(check, a, "viewer")
    assert await world.conn.fetchval(check, a, "member")
    assert not await world.conn.fetchval(check, a, "admin")
    assert not await world.conn.fetchval(check, a, "no-such-role")
    assert not await world.conn.fetchval(check, b, None)
    assert not await world.conn.fetchval(check, c, None)


async def test_policy_helper_runs_once_per_statement(world: World) -> None:
    await world.act_as("authenticated", "u")
    plan = "\n".join(
        row[0]
        for row in await world.conn.fetch(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT * FROM client_events"
        )
    )
    assert "hashed SubPlan" in plan
    assert "ProjectSet (actual rows=1 loops=1)" in plan, plan


async def test_members_read_but_never_write_reports(world: World) -> None:
    insert = (
        "INSERT INTO client_reports (client_id, requested_by, period_start, period_end, totals) "
        "VALUES ($1, $2, current_date, current_date, '{}')"
    )
    # The worker stores reports (as service_role); through Supabase's Data API a member
    # could otherwise store one with made-up totals, even for their own client.
    await world.act_as("service_role")
    await world.conn.execute(insert, world.clients["A"], world.users["u"])
    await world.act_as("authenticated", "u")
    assert len(await world.conn.fetch("SELECT * FROM client_reports")) == 1
    for client in ("A", "B", "D"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            async with world.conn.transaction():
                await world.conn.execute(insert, world.clients[client], world.users["u"])
    for statement in (
        "UPDATE client_events SET kind = 'x'",
        "DELETE FROM client_events",
        "UPDATE client_reports SET totals = '{}'",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with world.conn.transaction():
                await world.conn.execute(statement)


@pytest.mark.parametrize("role", ["authenticated", "service_role", "postgres"])
async def test_audit_log_cannot_be_updated_or_deleted(world: World, role: str) -> None:
    await world.conn.execute(
        "INSERT INTO audit_log (actor_kind, actor_id, client_id, action, outcome, reason) "
        "VALUES ('user', $1, $2, 'client-report', 'denied', 'rls test')",
        world.users["p"],
        world.clients["A"],
    )
    await world.act_as(role, "u" if role == "authenticated" else None)
    statements = ["UPDATE audit_log SET reason = 'rewritten'", "DELETE FROM audit_log"]
    if role != "authenticated":
        statements.append("TRUNCATE audit_log")
    for statement in statements:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with world.conn.transaction():
                await world.conn.execute(statement)
    if role == "service_role":
        await world.conn.execute(
            "INSERT INTO audit_log (actor_kind, action, outcome) "
            "VALUES ('scheduler', 'nightly-rollup', 'allowed')"
        )
    await world.back_to_postgres()
    assert (
        await world.conn.fetchval("SELECT count(*) FROM audit_log WHERE reason = 'rls test'") == 1
    )
