"""Demo data for the local stack: clients, users, memberships, an operator, events.

Idempotent: fixed ids, `ON CONFLICT DO NOTHING`, and events only for a client that has
none yet. Runs as the cluster's superuser, as an administrator would seed a project;
the worker's own code never writes `auth.users`.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from tenantflow.sealing import public_key, seal_access_token
from tenantflow_dev.auth_stand_in import create_user, mint_access_token
from tenantflow_dev.config import StackConfig

__all__ = [
    "DEMO_CLIENTS",
    "DEMO_MEMBER",
    "DEMO_MEMBERSHIPS",
    "DEMO_OPERATOR",
    "DemoClient",
    "DemoRun",
    "run_demo",
    "sealed_token",
    "seed_demo_data",
]

_NAMESPACE = uuid.UUID("3f1c9a52-5d1e-4c1b-9a55-0d3c6f2b7e10")


@dataclass(frozen=True)
class DemoClient:
    name: str
    status: str

    @property
    def id(self) -> uuid.UUID:
        return uuid.uuid5(_NAMESPACE, f"client:{self.name}")


ACME = DemoClient("Acme Corp", "active")
GLOBEX = DemoClient("Globex", "active")
INITECH = DemoClient("Initech", "active")
UMBRELLA = DemoClient("Umbrella", "suspended")
DEMO_CLIENTS = (ACME, GLOBEX, INITECH, UMBRELLA)

DEMO_OPERATOR = "ops@demo.tenantflow.test"
#: (email, client, role, accepted)
DEMO_MEMBERSHIPS = (
    ("alice@demo.tenantflow.test", ACME, "owner", True),
    ("bob@demo.tenantflow.test", ACME, "member", True),
    ("bob@demo.tenantflow.test", GLOBEX, "viewer", False),
    ("carol@demo.tenantflow.test", GLOBEX, "admin", True),
    ("dave@demo.tenantflow.test", INITECH, "member", False),
    ("erin@demo.tenantflow.test", UMBRELLA, "owner", True),
)
EVENTS_PER_CLIENT_DAY = 60
DAYS = 14
KINDS = ("purchase", "refund", "signup", "page_view")


async def seed_demo_data(config: StackConfig) -> dict[str, int]:
    """Insert the demo data once; return how many rows of each kind exist."""
    conn = await asyncpg.connect(**config.connect_parts(config.pg_port, admin=True))
    try:
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO public.clients (id, name, status) VALUES ($1, $2, $3) "
                "ON CONFLICT (id) DO NOTHING",
                [(c.id, c.name, c.status) for c in DEMO_CLIENTS],
            )
            passwords = config.secrets.demo_password
            await create_user(
                config,
                DEMO_OPERATOR,
                operator=True,
                password=passwords(DEMO_OPERATOR),
                conn=conn,
            )
            for email, client, role, accepted in DEMO_MEMBERSHIPS:
                user_id = await create_user(config, email, password=passwords(email), conn=conn)
                await conn.execute(
                    "INSERT INTO public.memberships (user_id, client_id, role, accepted_at) "
                    "VALUES ($1, $2, $3, CASE WHEN $4 THEN now() END) "
                    "ON CONFLICT (user_id, client_id) DO NOTHING",
                    user_id,
                    client.id,
                    role,
                    accepted,
                )
            for client in DEMO_CLIENTS:
                if await conn.fetchval(
                    "SELECT NOT EXISTS (SELECT 1 FROM public.client_events WHERE client_id = $1)",
                    client.id,
                ):
                    await conn.copy_records_to_table(
                        "client_events",
                        schema_name="public",
                        columns=["client_id", "occurred_at", "kind", "amount", "payload"],
                        records=_events(client),
                    )
        counts: dict[str, int] = {}
        for table in ("clients", "memberships", "client_events"):
            counts[table] = await conn.fetchval(f"SELECT count(*) FROM public.{table}")  # noqa: S608
        counts["users"] = await conn.fetchval("SELECT count(*) FROM auth.users")
        return counts
    finally:
        await conn.close()


def _events(client: DemoClient) -> list[tuple[uuid.UUID, datetime, str, Decimal | None, str]]:
    rng = random.Random(client.name)  # noqa: S311 - demo data, reproducible on purpose
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    rows = []
    for day in range(DAYS, -1, -1):
        start = today - timedelta(days=day)
        for _ in range(EVENTS_PER_CLIENT_DAY):
            kind = rng.choices(KINDS, weights=(5, 1, 2, 8))[0]
            amount = None
            if kind in ("purchase", "refund"):
                cents = rng.randint(500, 50_000)
                amount = Decimal(cents if kind == "purchase" else -cents) / 100
            at = start + timedelta(seconds=rng.randint(0, 86_399))
            rows.append((client.id, at, kind, amount, '{"source": "demo"}'))
    return rows


DEMO_MEMBER = "alice@demo.tenantflow.test"
DEMO_TOKEN_LIFETIME = 8 * 3600
#: Sealed values the demo prints live as long as the workers accept (SEAL_MAX_TTL_S).
DEMO_SEAL_LIFETIME = 3600
ROLLUP_DEPLOYMENT = "nightly-rollup/nightly-rollup"


async def sealed_token(
    config: StackConfig,
    email: str,
    *,
    flow: str,
    client_ids: Sequence[uuid.UUID] | None,
    parameters: Mapping[str, Any] | None = None,
    ttl_s: int = DEMO_SEAL_LIFETIME,
    operator: bool = False,
) -> str:
    """A fresh access token of `email`, sealed to the stack's workers for one run of `flow`
    with `parameters` (its other parameters)."""
    token = await mint_access_token(
        config, email, operator=operator, expires_in=max(ttl_s, DEMO_TOKEN_LIFETIME)
    )
    return seal_access_token(
        token,
        public_key(config.secrets.seal_private_key),
        flow=flow,
        client_ids=client_ids,
        parameters=parameters,
        ttl_s=ttl_s,
    )


@dataclass(frozen=True)
class DemoRun:
    """What `make up` shows an operator: the demo run and what to paste into a run form."""

    flow_run_id: uuid.UUID
    state: str
    message: str | None
    seconds: float
    ui_url: str
    member_email: str
    member_client: DemoClient
    #: The period the member's sealed token is bound to (a seal binds every parameter).
    report_period: tuple[date, date]
    member_token: str = field(repr=False)
    operator_token: str = field(repr=False)


async def run_demo(config: StackConfig) -> DemoRun:
    """Run `nightly-rollup` through the deployment and worker, with an operator's token.

    The run gets a sealed token of its own; the values returned for the run forms are
    fresh ones (a sealed token is good for one run).
    """
    # NOTE: Prefect here only: importing it costs seconds, and `tenantflow-dev status`,
    # `down` and `up` without the main job never need it.
    from prefect.deployments.flow_runs import arun_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    started = time.monotonic()
    with temporary_settings(
        {
            PREFECT_API_URL: config.prefect_api_url,
            PREFECT_API_AUTH_STRING: config.secrets.prefect_auth_string,
        }
    ):
        run = await arun_deployment(
            ROLLUP_DEPLOYMENT,
            parameters={
                "access_token": await sealed_token(
                    config, DEMO_OPERATOR, flow="nightly-rollup", client_ids=None
                )
            },
            timeout=600,
            poll_interval=1,
            tags=["demo"],
        )
    state = run.state
    today = datetime.now(UTC).date()
    period = (today - timedelta(days=30), today)
    return DemoRun(
        flow_run_id=run.id,
        state=(state.name or "Unknown") if state else "Unknown",
        message=state.message if state else None,
        seconds=time.monotonic() - started,
        ui_url=f"{config.prefect_ui_url}/runs/flow-run/{run.id}",
        member_email=DEMO_MEMBER,
        member_client=ACME,
        report_period=period,
        member_token=await sealed_token(
            config,
            DEMO_MEMBER,
            flow="client-report",
            client_ids=[ACME.id],
            parameters={"period_start": period[0], "period_end": period[1]},
        ),
        operator_token=await sealed_token(
            config, DEMO_OPERATOR, flow="nightly-rollup", client_ids=None
        ),
    )
