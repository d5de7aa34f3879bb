"""A small world of clients, users, memberships and events: the shared fixtures `world`,
`db_limit` and `parked_runs` of the guard, flow, fault and end-to-end tests.

Registered as a plugin by `tests/conftest.py` for every run that uses the stack.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound

from tenantflow.auth import clear_jwks_cache
from tenantflow.sealing import public_key, seal_access_token
from tenantflow.settings import get_settings
from tenantflow_dev import Stack
from tenantflow_dev.auth_stand_in import create_user, delete_user, mint_access_token


@dataclass
class World:
    stack: Stack
    clients: dict[str, uuid.UUID] = field(default_factory=dict)
    users: dict[str, uuid.UUID] = field(default_factory=dict)
    emails: dict[str, str] = field(default_factory=dict)

    async def token(self, who: str, *, operator: bool = False) -> str:
        return await mint_access_token(self.stack.config, self.emails[who], operator=operator)

    async def sealed(
        self,
        who: str,
        *,
        flow: str,
        clients: list[str] | None,
        operator: bool = False,
        **options: Any,
    ) -> str:
        """`who`'s access token sealed to the stack's workers for one run of `flow`."""
        token = await self.token(who, operator=operator)
        return self.seal(token, flow=flow, clients=clients, **options)

    async def sealed_rollup(
        self, day: date, *, clients: list[str] | None = None, ids: list[uuid.UUID] | None = None
    ) -> str:
        """The operator's token sealed for one `nightly-rollup` run of `day` on `clients`
        (the world's, by name) or on the clients `ids` (a test's own); neither: every active
        client, which in a shared stack may be thousands: a test sweeps its own."""
        parameters = {"day": day}
        if ids is None:
            return await self.sealed(
                "operator",
                flow="nightly-rollup",
                clients=clients,
                operator=True,
                parameters=parameters,
            )
        token = await self.token("operator", operator=True)
        return seal_access_token(
            token,
            public_key(self.stack.config.secrets.seal_private_key),
            flow="nightly-rollup",
            client_ids=ids,
            parameters=parameters,
        )

    def seal(self, token: str, *, flow: str, clients: list[str] | None, **options: Any) -> str:
        """`token` sealed to the stack's workers for one run of `flow` on `clients`."""
        return seal_access_token(
            token,
            public_key(self.stack.config.secrets.seal_private_key),
            flow=flow,
            client_ids=None if clients is None else [self.clients[c] for c in clients],
            **options,
        )

    async def admin(self) -> asyncpg.Connection:
        config = self.stack.config
        return await asyncpg.connect(**config.connect_parts(config.pg_port, admin=True))

    async def day_totals(self, clients: list[uuid.UUID], day: date) -> dict[uuid.UUID, tuple]:
        """(events, revenue) of each client's UTC `day`, counted straight from the events."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        rows = await self.sql(
            "fetch",
            "SELECT c, count(e.id), coalesce(sum(e.amount), 0) FROM unnest($1::uuid[]) AS c "
            "LEFT JOIN public.client_events AS e "
            "ON e.client_id = c AND e.occurred_at >= $2 AND e.occurred_at < $3 GROUP BY c",
            clients,
            start,
            start + timedelta(days=1),
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    async def assert_rolled_up_once(self, clients: list[uuid.UUID], day: date) -> None:
        """Each of `clients` has exactly one metrics row of `day`, equal to the totals
        counted straight from its events (a client without events gets a row of zeros)."""
        rows = await self.sql(
            "fetch",
            "SELECT client_id, count(*) AS n, max(events) AS events, max(revenue) AS revenue "
            "FROM public.client_daily_metrics WHERE client_id = ANY($1::uuid[]) AND day = $2 "
            "GROUP BY client_id",
            clients,
            day,
        )
        assert all(r["n"] == 1 for r in rows), "a client has more than one row of the day"
        expected = await self.day_totals(clients, day)
        assert {r["client_id"]: (r["events"], r["revenue"]) for r in rows} == expected

    async def add_clients(self, count: int, *, prefix: str, events: bool = True) -> list[uuid.UUID]:
        """`count` more active clients (named `prefix-<tag>-n`); with `events`, client n
        gets n % 3 + 1 purchases around noon today (UTC). `remove_clients` deletes them."""
        tag = uuid.uuid4().hex[:8]
        ids = [uuid.uuid4() for _ in range(count)]
        noon = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
        conn = await self.admin()
        try:
            await conn.copy_records_to_table(
                "clients",
                schema_name="public",
                columns=["id", "name"],
                records=[(i, f"{prefix}-{tag}-{n:05d}") for n, i in enumerate(ids)],
            )
            if events:
                await conn.copy_records_to_table(
                    "client_events",
                    schema_name="public",
                    columns=["client_id", "occurred_at", "kind", "amount"],
                    records=[
                        (client, noon - timedelta(minutes=k), "purchase", n % 7 + k + 1)
                        for n, client in enumerate(ids)
                        for k in range(n % 3 + 1)
                    ],
                )
        finally:
            await conn.close()
        return ids

    @asynccontextmanager
    async def metrics_trigger(
        self,
        client: uuid.UUID,
        action: str,
        *,
        counter: bool = False,
        table: str = "client_daily_metrics",
    ) -> AsyncIterator[str]:
        """A BEFORE INSERT trigger on `table` (public; default `client_daily_metrics`) that
        runs the plpgsql `action` for `client`'s rows (`{name}` in it is the trigger's name;
        with `counter`, the sequence `public.{name}_calls` exists); everything is dropped
        afterwards."""
        name = f"tf_test_{uuid.uuid4().hex[:8]}"
        conn = await self.admin()
        try:
            if counter:
                await conn.execute(f"CREATE SEQUENCE public.{name}_calls")
                await conn.execute(f"GRANT USAGE ON SEQUENCE public.{name}_calls TO service_role")
            await conn.execute(
                f"CREATE FUNCTION public.{name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF NEW.client_id = '{client}' THEN {action.format(name=name)} "
                "END IF; RETURN NEW; END $$"
            )
            await conn.execute(
                f"CREATE TRIGGER {name} BEFORE INSERT ON public.{table} "
                f"FOR EACH ROW EXECUTE FUNCTION public.{name}()"
            )
            yield name
        finally:
            await conn.execute(f"DROP TRIGGER IF EXISTS {name} ON public.{table}")
            await conn.execute(f"DROP FUNCTION IF EXISTS public.{name}()")
            await conn.execute(f"DROP SEQUENCE IF EXISTS public.{name}_calls")
            await conn.close()

    async def remove_clients(self, ids: list[uuid.UUID]) -> None:
        await self.sql("execute", "DELETE FROM public.clients WHERE id = ANY($1::uuid[])", ids)

    async def sql(self, method: str, query: str, *args: Any) -> Any:
        """One statement as the cluster's superuser: `await world.sql("fetch", ...)`."""
        conn = await self.admin()
        try:
            return await getattr(conn, method)(query, *args)
        finally:
            await conn.close()


async def taken_slots() -> int:
    """How many slots of the `tenantflow-db` limit are taken now."""
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(
            get_settings().db_concurrency_limit
        )
    return limit.active_slots


async def shard_runs(parent: uuid.UUID) -> list[FlowRun]:
    """The shard runs (child flow runs) of the sweep `parent`."""
    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])
            )
        )


CLIENTS = {"a": "active", "b": "active", "s": "suspended"}
#: name → (client, role, accepted)
MEMBERS = {
    "member_a": ("a", "member", True),
    "viewer_a": ("a", "viewer", True),
    "pending_a": ("a", "member", False),
    "member_b": ("b", "owner", True),
    "member_s": ("s", "owner", True),
    "outsider": None,
    "operator": None,
    "revoked_operator": None,
}
EVENTS_PER_CLIENT = 5


@pytest.fixture(scope="session")
def db_limit(stack: Stack) -> str:
    """The strict global concurrency limit the flows take their slots from."""
    name = get_settings().db_concurrency_limit

    async def ensure() -> None:
        async with get_client() as client:
            try:
                await client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=10)
                )

    asyncio.run(ensure())
    return name


@pytest.fixture
async def world(stack: Stack) -> AsyncIterator[World]:
    clear_jwks_cache()
    world = World(stack)
    tag = uuid.uuid4().hex[:8]
    conn = await world.admin()
    try:
        for key, status in CLIENTS.items():
            world.clients[key] = await conn.fetchval(
                "INSERT INTO public.clients (name, status) VALUES ($1, $2) RETURNING id",
                f"guard-{key}-{tag}",
                status,
            )
            await conn.executemany(
                "INSERT INTO public.client_events (client_id, occurred_at, kind, amount) "
                "VALUES ($1, now() - make_interval(hours => $2), 'purchase', 10)",
                [(world.clients[key], n) for n in range(EVENTS_PER_CLIENT)],
            )
        for who, membership in MEMBERS.items():
            email = f"{who}-{tag}@guard.test"
            world.emails[who] = email
            world.users[who] = await create_user(
                stack.config, email, operator=who == "operator", conn=conn
            )
            if membership is not None:
                client, role, accepted = membership
                await conn.execute(
                    "INSERT INTO public.memberships (user_id, client_id, role, accepted_at) "
                    "VALUES ($1, $2, $3, CASE WHEN $4 THEN now() END)",
                    world.users[who],
                    world.clients[client],
                    role,
                    accepted,
                )
    finally:
        await conn.close()
    yield world
    conn = await world.admin()
    try:
        await conn.execute(
            "DELETE FROM public.clients WHERE id = ANY($1::uuid[])", list(world.clients.values())
        )
    finally:
        await conn.close()
    for email in world.emails.values():
        await delete_user(stack.config, email)


@pytest.fixture
async def parked_runs(stack: Stack) -> AsyncIterator[Callable[..., Awaitable[FlowRun]]]:
    """Create flow runs that no worker will ever pick up (a deployment without a pool).

    The guard reads a run from the Prefect API (its parameters, who created it); these
    give it real runs to read without executing anything.
    """
    async with get_client() as client:
        flow_id = await client.create_flow_from_name(f"guard-test-{uuid.uuid4().hex[:6]}")
        deployment_id = await client.create_deployment(flow_id=flow_id, name="parked")

    async def create(**parameters: Any) -> FlowRun:
        async with get_client() as client:
            return await client.create_flow_run_from_deployment(
                deployment_id, parameters=parameters
            )

    yield create
    async with get_client() as client:
        await client.delete_deployment(deployment_id)
