"""The tenant guard: who may touch which client's data, settled once per run.

A flow that touches client data calls `authorize_run()` first. It opens the run's
sealed access token, settles the run's **actor**, checks it against the flow's mode and
the clients asked for, writes every decision to `audit_log`, and hands back one
`TenantContext` per client. Tenant work (`tenantflow.batches`) takes those contexts;
`tenant_session(ctx)`, which refuses anything else, is its only way to a database
session: for a user it carries the verified claims and `SET LOCAL ROLE authenticated`,
so row-level security checks the membership a second time inside Postgres; for the
scheduler and operators it runs as `service_role`. The guard's own reads and writes run
as `service_role` too: the workers' login role can do nothing by itself
(docs/security.md).

| actor | how it is recognised |
|---|---|
| scheduler | no token; the flow run, read from the Prefect API, was created by a schedule |
|           | that this project's `prefect.yaml` declares, with exactly its parameters   |
| operator | a verified token whose `app_metadata` grants `tenantflow_operator`, |
|          | confirmed in `auth.users` at run time and with Supabase Auth        |
| user | any other verified token |

Tokens reach a flow run sealed to the workers (`tenantflow.sealing`): Prefect stores and
shows only ciphertext. A seal is bound to the flow and its clients, expires soon, and is
good for one flow run: the first run that opens it records that in the database.

Service-mode flows admit the scheduler and operators; operator-mode flows (`migrate`)
admit operators only; user-mode flows admit a user (an operator too, acting with their
own token) with an accepted membership in an active client, optionally of a minimum
role. Everything else is denied before any tenant query, and the run fails with the
reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, ParamSpec, TypeVar
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext
from pydantic import Field, SecretStr
from sqlalchemy import bindparam, text

from tenantflow.auth import (
    AuthError,
    AuthServiceUnavailable,
    VerifiedClaims,
    app_metadata_grants_operator,
)
from tenantflow.auth import verify_access_token as _verify_access_token
from tenantflow.budget import one_transaction_slot, transaction_slot
from tenantflow.db import Executor, unit_of_work
from tenantflow.deployments import DeployError, declared_deployment
from tenantflow.errors import TenantflowError
from tenantflow.schema import MEMBER_ROLES
from tenantflow.sealing import (
    OpenedSeal,
    SealError,
    looks_like_plain_jwt,
    open_sealed_token,
)
from tenantflow.settings import Settings, get_settings

__all__ = [
    "REDACTED",
    "AccessDenied",
    "Actor",
    "ActorKind",
    "Mode",
    "SealedAccessToken",
    "ShardGrant",
    "ShardResult",
    "TenantContext",
    "authorize_run",
    "authorize_shard",
    "authorize_token",
    "current_flow_run_id",
    "delegate_shard",
    "read_shard_result",
    "record_shard_result",
    "redact_token_on_failure",
    "require_membership",
    "tenant_session",
]

log = logging.getLogger("tenantflow.tenancy")

#: What a plain (unsealed) token found in a run's stored parameters is replaced with.
REDACTED: Final = "[redacted by tenantflow: a plain access token is never kept]"
SERVICE_ROLE: Final = "service_role"
SERVICE_CLAIMS: Final = json.dumps({"role": SERVICE_ROLE})

#: The type of every flow's `access_token` parameter: a sealed token (JWE compact
#: serialization, five base64url segments). With the deployment's parameter schema
#: enforced, the Prefect server refuses anything else (a plain JWT pasted by mistake)
#: before it stores it; the guard refuses it again, and removes it, for runs created
#: around the schema.
SealedAccessToken = Annotated[
    str,
    Field(
        # NOTE: in the JSON schema only (which the server enforces when a run is created):
        # a pattern that pydantic checked in the flow would make Prefect log the refused
        # value; the guard refuses it instead, without repeating it.
        # `format: password` gives the run form a one-line box: the value is ciphertext,
        # but about 2 KB without a space, which a text area spreads across the page.
        json_schema_extra={
            "pattern": r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){4}$",
            "maxLength": 16384,
            "format": "password",
        },
        description=(
            "A sealed access token: `tenantflow seal --flow FLOW --client CLIENT_ID` "
            "(or tenantflow.sealing.seal_access_token) turns a Supabase access token "
            "into one. A plain access token is refused."
        ),
    ),
]

Mode = Literal["user", "service", "operator"]

P = ParamSpec("P")
R = TypeVar("R")


class ActorKind(StrEnum):
    USER = "user"
    OPERATOR = "operator"
    SCHEDULER = "scheduler"


@dataclass(frozen=True)
class Actor:
    kind: ActorKind
    user_id: UUID | None = None
    email: str | None = None
    claims: VerifiedClaims | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        if self.kind is ActorKind.SCHEDULER:
            return "the deployment's schedule"
        return f"{self.kind.value} {self.email or self.user_id}"


class AccessDenied(TenantflowError):
    """The run may not touch the client's data. The message is safe to show an operator."""


_SEAL: Final = object()


@dataclass(frozen=True)
class TenantContext:
    """Proof that the guard allowed `actor` to act on `client_id` in this flow run."""

    actor: Actor
    client_id: UUID
    client_name: str
    flow_run_id: UUID | None
    membership_role: str | None = None
    seal: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.seal is not _SEAL:
            raise AccessDenied("a TenantContext is issued by the tenant guard only")

    @property
    def label(self) -> str:
        return f"{self.client_name} ({self.client_id})"


# --------------------------------------------------------------------------- audit


@asynccontextmanager
async def _guard_unit(settings: Settings) -> AsyncIterator[Executor]:
    """A transaction for the guard's own reads and writes, as `service_role`, within the
    database budget (one slot while it lasts).

    NOTE: the workers' login role is NOINHERIT and owns nothing; every statement runs
    under a role switched to inside the transaction.
    """
    async with (
        one_transaction_slot(settings=settings),
        unit_of_work(
            local_settings={"request.jwt.claims": SERVICE_CLAIMS},
            role=SERVICE_ROLE,
            settings=settings,
        ) as session,
    ):
        yield session


async def _audit(
    settings: Settings,
    *,
    flow_run_id: UUID | None,
    actor: Actor | None,
    client_ids: Sequence[UUID | None],
    action: str,
    outcome: Literal["allowed", "denied"],
    reason: str | None,
) -> None:
    """Append one row per client to `audit_log`, in a transaction of its own."""
    statement = text(
        "INSERT INTO public.audit_log "
        "(flow_run_id, actor_kind, actor_id, client_id, action, outcome, reason) "
        "SELECT :flow_run_id, :actor_kind, :actor_id, c, :action, :outcome, :reason "
        "FROM unnest(CAST(:client_ids AS uuid[])) AS c"
    )
    async with _guard_unit(settings) as session:
        await session.execute(
            statement,
            {
                "flow_run_id": flow_run_id,
                "actor_kind": (actor.kind if actor else ActorKind.USER).value,
                "actor_id": actor.user_id if actor else None,
                "client_ids": list(client_ids) or [None],
                "action": action,
                "outcome": outcome,
                "reason": reason,
            },
        )


# --------------------------------------------------------------------------- the token


async def _read_flow_run(flow_run_id: UUID) -> FlowRun:
    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


async def _redact_token_parameter(flow_run: FlowRun) -> None:
    """Replace a plain token in the run's stored `access_token` parameter.

    Sealed tokens are ciphertext and stay; a plain JWT reaches Prefect only when someone
    created the run around the parameter schema, and is removed as soon as it is seen.
    """
    stored = flow_run.parameters.get("access_token")
    if not isinstance(stored, str) or not looks_like_plain_jwt(stored):
        return
    parameters = {**flow_run.parameters, "access_token": REDACTED}
    async with get_client() as client:
        await client.update_flow_run(flow_run.id, parameters=parameters)


async def redact_token_on_failure(flow: Any, flow_run: FlowRun, state: State[Any] | None) -> None:
    """Flow hook (`on_failure`, `on_crashed`): a run that failed before its guard ran (on
    invalid parameters, say) still gets a plain token removed from its parameters."""
    await _redact_token_parameter(flow_run)


async def _use_seal(settings: Settings, opened: OpenedSeal, flow_run_id: UUID) -> UUID:
    """Record that `flow_run_id` opened the seal; returns the run that holds it."""
    async with _guard_unit(settings) as session:
        holder: UUID = (
            await session.execute(
                text(
                    "SELECT tenantflow_private.use_seal("
                    "CAST(:seal_id AS text), CAST(:flow_run_id AS uuid), "
                    "CAST(:flow AS text), CAST(:expires_at AS timestamptz))"
                ),
                {
                    "seal_id": opened.seal_id,
                    "flow_run_id": flow_run_id,
                    "flow": opened.flow,
                    "expires_at": opened.expires_at,
                },
            )
        ).scalar_one()
    return holder


async def _open_run_token(
    settings: Settings,
    sealed: str,
    flow_run: FlowRun | None,
    flow: str,
    client_ids: Sequence[UUID] | None,
) -> SecretStr:
    """Open the run's sealed token and claim it for this run (single use)."""
    if flow_run is not None and looks_like_plain_jwt(sealed):
        await _redact_token_parameter(flow_run)
    if sealed == REDACTED:
        raise AccessDenied(
            "this run's access_token was a plain access token and has been removed; "
            "start a new run with a sealed access token (tenantflow seal)"
        )
    if flow_run is None:
        raise AccessDenied("a sealed access token is only opened inside a flow run")
    if settings.seal_private_keys is None:
        raise AccessDenied(
            "this worker cannot open sealed access tokens: SEAL_PRIVATE_KEYS is not set "
            "in its environment (tenantflow seal-key generate)"
        )
    try:
        opened = open_sealed_token(
            sealed,
            settings.seal_private_keys.get_secret_value(),
            flow=flow,
            client_ids=client_ids,
            max_ttl_s=settings.seal_max_ttl_s,
            leeway_s=settings.auth_leeway_s,
        )
    except SealError as error:
        raise AccessDenied(f"sealed access token refused: {error}") from None
    holder = await _use_seal(settings, opened, flow_run.id)
    if holder != flow_run.id:
        raise AccessDenied(
            f"sealed access token refused: it was already used by flow run {holder}; "
            "a sealed token is good for one run, seal a fresh one for this run"
        )
    return opened.token


# --------------------------------------------------------------------------- actor


async def _operator_confirmed(settings: Settings, user_id: UUID) -> bool:
    """Read the operator grant from `auth.users`: a token's `app_metadata` is stale."""
    async with _guard_unit(settings) as session:
        app_metadata = (
            await session.execute(
                text("SELECT tenantflow_private.operator_app_metadata(CAST(:id AS uuid))"),
                {"id": user_id},
            )
        ).scalar_one()
    return app_metadata_grants_operator(app_metadata)


#: Attempts at a check that needs Supabase Auth while it is unreachable (1 + 2 + 4 s apart).
AUTH_ATTEMPTS: Final = 4


async def _verified(
    settings: Settings, token: SecretStr, allow_anonymous: bool, *, strict: bool | None = None
) -> VerifiedClaims:
    """`verify_access_token`, retried a few times while Supabase Auth is unreachable (a
    transient failure); every other refusal is final at once."""
    for attempt in range(1, AUTH_ATTEMPTS):
        try:
            return await _verify_access_token(
                token, settings=settings, allow_anonymous=allow_anonymous, strict=strict
            )
        except AuthServiceUnavailable:
            await asyncio.sleep(2 ** (attempt - 1))
    try:
        return await _verify_access_token(
            token, settings=settings, allow_anonymous=allow_anonymous, strict=strict
        )
    except AuthServiceUnavailable as error:
        raise AuthServiceUnavailable(
            f"{error.message} ({AUTH_ATTEMPTS} attempts over "
            f"{2 ** (AUTH_ATTEMPTS - 1) - 1} s); start the run again later"
        ) from None


async def _verify_actor(settings: Settings, token: SecretStr, allow_anonymous: bool) -> Actor:
    try:
        claims = await _verified(settings, token, allow_anonymous)
    except AuthError as error:
        raise AccessDenied(f"access token refused: {error}") from None
    kind = ActorKind.USER
    if claims.token_grants_operator and await _operator_confirmed(settings, claims.sub):
        # NOTE: an operator may act on every client: ask Supabase Auth too, so a
        # signed-out session or a deleted user cannot use a still-unexpired token.
        try:
            claims = await _verified(settings, token, allow_anonymous, strict=True)
        except AuthError as error:
            raise AccessDenied(f"operator token refused: {error}") from None
        kind = ActorKind.OPERATOR
    return Actor(kind, claims.sub, claims.email, claims)


_NO_TOKEN_REASON = "no access_token: " + (
    "only runs created by the project's own schedule may run without one; paste a "
    "sealed access token (tenantflow seal) into the run's access_token"
)


async def _scheduler(flow_run: FlowRun | None) -> Actor:
    """The scheduler, if the project's own declared schedule created this run as declared.

    `auto_scheduled` and `created_by` cannot be set by an API client; the schedule they
    point at, the deployment's parameters and the run's parameters can all be changed
    through the API, so each is compared with the worker's own `prefect.yaml`.
    """
    created_by = flow_run.created_by if flow_run is not None else None
    if (
        flow_run is None
        or not flow_run.auto_scheduled
        or created_by is None
        or created_by.type != "SCHEDULE"
        or flow_run.deployment_id is None
    ):
        raise AccessDenied(_NO_TOKEN_REASON)
    async with get_client() as client:
        deployment = await client.read_deployment(flow_run.deployment_id)
    try:
        declared = declared_deployment(deployment.name)
    except DeployError as error:
        raise AccessDenied(f"cannot check the schedule against prefect.yaml: {error}") from None
    schedule = next((s for s in deployment.schedules if s.id == created_by.id), None)
    expected = None
    if declared is not None and schedule is not None:
        expected = declared.schedule(schedule.slug)
    if declared is None or schedule is None or expected is None:
        raise AccessDenied(
            f"this run was created by a schedule ({created_by.display_value}) that the "
            f"project does not declare for deployment {deployment.name}; "
            "only the project's own schedules may run without an access_token"
        )
    cron = getattr(schedule.schedule, "cron", None)
    timezone = getattr(schedule.schedule, "timezone", None) or "UTC"
    if (cron, timezone) != (expected.cron, expected.timezone):
        raise AccessDenied(
            f"schedule {expected.slug} was changed through the Prefect API ({cron} {timezone}, "
            f"declared {expected.cron} {expected.timezone}); redeploy the project"
        )
    parameters = {**declared.parameters, **expected.parameters}
    if flow_run.parameters != parameters:
        changed = sorted(set(flow_run.parameters) ^ set(parameters)) or sorted(
            k for k in parameters if flow_run.parameters.get(k) != parameters[k]
        )
        raise AccessDenied(
            f"this scheduled run's parameters differ from schedule {expected.slug}'s in "
            f"prefect.yaml ({', '.join(changed)}); a run with other parameters needs an "
            "operator's sealed access token"
        )
    return Actor(ActorKind.SCHEDULER)


# --------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class _Membership:
    client_name: str
    role: str


async def require_membership(
    session: Executor, *, user_id: UUID, client_id: UUID, min_role: str | None = None
) -> _Membership:
    """An accepted membership of `user_id` in the active client `client_id`.

    NOTE: a client that does not exist and one the user is no member of get the same
    answer, so a refusal never tells whether some other tenant's id is real.

    Raises:
        AccessDenied: no membership, not accepted yet, client not active, role too low.
    """
    if min_role is not None and min_role not in MEMBER_ROLES:
        raise ValueError(f"unknown membership role {min_role!r}; one of {MEMBER_ROLES}")
    row = (
        await session.execute(
            text(
                "SELECT c.name, c.status, m.role, m.accepted_at IS NOT NULL "
                "FROM public.memberships AS m "
                "JOIN public.clients AS c ON c.id = m.client_id "
                "WHERE m.client_id = :client_id AND m.user_id = :user_id"
            ),
            {"user_id": user_id, "client_id": client_id},
        )
    ).one_or_none()
    if row is None:
        raise AccessDenied(f"user {user_id} has no membership in client {client_id}")
    name, status, role, accepted = row
    if not accepted:
        raise AccessDenied(
            f"user {user_id}'s membership in client {client_id} has not been accepted"
        )
    if status != "active":
        raise AccessDenied(f"client {client_id} is {status}, not active")
    if min_role is not None and MEMBER_ROLES.index(role) < MEMBER_ROLES.index(min_role):
        raise AccessDenied(
            f"user {user_id} is {role} in client {client_id}; this flow needs {min_role} or above"
        )
    return _Membership(name, role)


async def _active_clients(session: Executor, client_ids: Sequence[UUID] | None) -> dict[UUID, str]:
    if client_ids is None:
        rows = await session.execute(
            text("SELECT id, name FROM public.clients WHERE status = 'active' ORDER BY name, id")
        )
        return {row[0]: row[1] for row in rows}
    rows = await session.execute(
        text("SELECT id, name, status FROM public.clients WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        ),
        {"ids": list(client_ids)},
    )
    found = {row[0]: (row[1], row[2]) for row in rows}
    missing = [str(c) for c in client_ids if c not in found]
    if missing:
        raise AccessDenied(f"unknown client(s): {', '.join(missing)}")
    inactive = [f"{c} ({status})" for c, (_, status) in found.items() if status != "active"]
    if inactive:
        raise AccessDenied(f"client(s) not active: {', '.join(inactive)}")
    return {c: found[c][0] for c in client_ids}


# --------------------------------------------------------------------------- the guard


def _current_flow_run_id() -> UUID | None:
    context = FlowRunContext.get()
    return context.flow_run.id if context and context.flow_run else None


def current_flow_run_id() -> UUID:
    """The id of the flow run this code runs in.

    Raises:
        RuntimeError: outside a flow run.
    """
    flow_run_id = _current_flow_run_id()
    if flow_run_id is None:
        raise RuntimeError("not inside a flow run")
    return flow_run_id


def _plain(value: SecretStr | str | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


async def authorize_run(
    *,
    action: str,
    mode: Mode,
    access_token: SecretStr | str | None,
    client_ids: Sequence[UUID] | None,
    min_role: str | None = None,
    allow_anonymous: bool = False,
    flow_run_id: UUID | None = None,
    settings: Settings | None = None,
) -> list[TenantContext]:
    """Open the run's sealed token, settle the actor, check it, audit, issue contexts.

    Args:
        action: the flow's name: the audit log's action, and what the sealed token must
            have been sealed for.
        mode: `user` flows act for one user in one client (membership required);
            `service` flows act for the platform (scheduler or operator); `operator`
            flows (migrations) for operators only.
        access_token: the run's `access_token` parameter: a sealed token, or None.
        client_ids: the clients asked for; `None` in service mode means every active
            client. User mode takes exactly one. The sealed token must name the same.
        min_role: user mode: the lowest membership role allowed.
        flow_run_id: defaults to the current flow run.

    Raises:
        AccessDenied: with the reason; the decision is already in `audit_log`.
    """
    settings = settings or get_settings()
    flow_run_id = flow_run_id or _current_flow_run_id()
    flow_run = await _read_flow_run(flow_run_id) if flow_run_id else None
    sealed = _plain(access_token)

    async def token() -> SecretStr | None:
        if not sealed:
            return None
        return await _open_run_token(settings, sealed, flow_run, action, client_ids)

    return await _decide(
        settings, action, mode, token, client_ids, min_role, allow_anonymous, flow_run
    )


async def authorize_token(
    *,
    action: str,
    mode: Mode,
    access_token: SecretStr | str | None,
    client_ids: Sequence[UUID] | None,
    min_role: str | None = None,
    allow_anonymous: bool = False,
    flow_run_id: UUID | None = None,
    settings: Settings | None = None,
) -> list[TenantContext]:
    """The guard's decision for a plain access token that is already in hand.

    Flows never call this: their token arrives sealed through Prefect (`authorize_run`).
    It serves code that holds a user's token without Prefect in between, and states the
    decision table on its own. Arguments as for `authorize_run`.
    """
    settings = settings or get_settings()
    flow_run_id = flow_run_id or _current_flow_run_id()
    flow_run = await _read_flow_run(flow_run_id) if flow_run_id else None
    plain = _plain(access_token)

    async def token() -> SecretStr | None:
        return SecretStr(plain) if plain else None

    return await _decide(
        settings, action, mode, token, client_ids, min_role, allow_anonymous, flow_run
    )


async def _decide(
    settings: Settings,
    action: str,
    mode: Mode,
    token: Callable[[], Awaitable[SecretStr | None]],
    client_ids: Sequence[UUID] | None,
    min_role: str | None,
    allow_anonymous: bool,
    flow_run: FlowRun | None,
) -> list[TenantContext]:
    flow_run_id = flow_run.id if flow_run is not None else None
    actor: Actor | None = None
    asked: list[UUID | None] = list(client_ids) if client_ids is not None else [None]
    try:
        opened = await token()
        if opened is not None:
            actor = await _verify_actor(settings, opened, allow_anonymous)
        else:
            actor = await _scheduler(flow_run)
        contexts = await _admit(settings, actor, mode, client_ids, min_role, flow_run_id)
    except AccessDenied as denied:
        await _audit(
            settings,
            flow_run_id=flow_run_id,
            actor=actor,
            client_ids=asked,
            action=action,
            outcome="denied",
            reason=str(denied),
        )
        raise
    await _audit(
        settings,
        flow_run_id=flow_run_id,
        actor=actor,
        client_ids=[c.client_id for c in contexts] or [None],
        action=action,
        outcome="allowed",
        reason=f"{actor.kind.value} in {mode} mode",
    )
    return contexts


async def _admit(
    settings: Settings,
    actor: Actor,
    mode: Mode,
    client_ids: Sequence[UUID] | None,
    min_role: str | None,
    flow_run_id: UUID | None,
) -> list[TenantContext]:
    if mode == "operator":
        if actor.kind is not ActorKind.OPERATOR:
            raise AccessDenied(
                f"{actor.describe()} may not start this flow: only a tenantflow operator "
                "(app_metadata role tenantflow_operator) may"
            )
        return []
    if mode == "service":
        if actor.kind is ActorKind.USER:
            raise AccessDenied(
                f"{actor.describe()} may not start this service flow: it runs on its "
                "schedule or by an operator (app_metadata role tenantflow_operator)"
            )
        async with _guard_unit(settings) as session:
            clients = await _active_clients(session, client_ids)
        return [
            TenantContext(actor, client_id, name, flow_run_id, seal=_SEAL)
            for client_id, name in clients.items()
        ]
    if actor.kind is ActorKind.SCHEDULER or actor.user_id is None:
        raise AccessDenied("this flow acts for a user: it needs that user's access_token")
    if client_ids is None or len(client_ids) != 1:
        raise AccessDenied("this flow acts on exactly one client")
    async with _guard_unit(settings) as session:
        membership = await require_membership(
            session, user_id=actor.user_id, client_id=client_ids[0], min_role=min_role
        )
    return [
        TenantContext(
            actor,
            client_ids[0],
            membership.client_name,
            flow_run_id,
            membership_role=membership.role,
            seal=_SEAL,
        )
    ]


# --------------------------------------------------------------------------- shards


#: How long a shard run may wait for a worker before its grant is void.
SHARD_GRANT_LIFETIME = timedelta(hours=6)


@dataclass(frozen=True)
class ShardGrant:
    """What a parent sweep delegated to one shard run: its day, its clients, its actor."""

    child_run_id: UUID
    parent_run_id: UUID
    shard: str
    day: date
    contexts: list[TenantContext]
    #: Delegated clients that are no longer active: reported, not touched.
    inactive: list[UUID]


async def delegate_shard(
    contexts: Sequence[TenantContext],
    *,
    child_run_id: UUID,
    parent_run_id: UUID,
    action: str,
    day: date,
    shard: str,
    settings: Settings | None = None,
) -> None:
    """Write the grant that lets `child_run_id` act on these clients (the parent's contexts).

    NOTE: only a parent the guard admitted holds contexts, and the grant is keyed by the
    child's flow run id: a run created through the Prefect API finds no grant of its own.
    """
    if not contexts or any(
        not isinstance(c, TenantContext) or c.seal is not _SEAL for c in contexts
    ):
        raise AccessDenied("only contexts from the tenant guard can be delegated")
    actor = contexts[0].actor
    if actor.kind is ActorKind.USER:
        raise AccessDenied("a user's work is never delegated to shards")
    async with _guard_unit(settings or get_settings()) as session:
        await session.execute(
            text(
                "INSERT INTO tenantflow_private.shard_grants (child_run_id, parent_run_id, "
                "flow, day, client_ids, actor_kind, actor_id, shard, expires_at) "
                "VALUES (:child, :parent, :flow, :day, CAST(:clients AS uuid[]), :kind, "
                ":actor_id, :shard, now() + :lifetime)"
            ),
            {
                "child": child_run_id,
                "parent": parent_run_id,
                "flow": action,
                "day": day,
                "clients": [c.client_id for c in contexts],
                "kind": actor.kind.value,
                "actor_id": actor.user_id,
                "shard": shard,
                "lifetime": SHARD_GRANT_LIFETIME,
            },
        )


async def authorize_shard(
    *, action: str, flow_run_id: UUID | None = None, settings: Settings | None = None
) -> ShardGrant:
    """A shard run's authorization: the grant its parent wrote for this very flow run.

    Nothing comes from the run's parameters or its place in Prefect: the grant is found by
    the run's own id, must be for `action`, unexpired and not already finished. The
    decision is audited like every other (the reason names the parent run).

    Raises:
        AccessDenied: no grant, another flow's, expired, or already run.
    """
    settings = settings or get_settings()
    flow_run_id = flow_run_id or _current_flow_run_id()
    try:
        if flow_run_id is None:
            raise AccessDenied("a shard runs only as a flow run started by its parent sweep")
        async with _guard_unit(settings) as session:
            row = (
                await session.execute(
                    text(
                        "SELECT parent_run_id, flow, day, client_ids, actor_kind, actor_id, "
                        "shard, expires_at < now() AS expired, finished_at IS NOT NULL AS done "
                        "FROM tenantflow_private.shard_grants WHERE child_run_id = :id "
                        "FOR UPDATE"
                    ),
                    {"id": flow_run_id},
                )
            ).one_or_none()
            if row is None:
                raise AccessDenied(
                    "no shard grant for this flow run: shard runs are started by their parent "
                    f"sweep, which delegates their clients to them; start {action} instead"
                )
            if row.flow != action or row.expired or row.done:
                why = (
                    f"is for {row.flow}"
                    if row.flow != action
                    else "has expired"
                    if row.expired
                    else "was already used by this run"
                )
                raise AccessDenied(f"the shard grant of this flow run {why}")
            await session.execute(
                text(
                    "UPDATE tenantflow_private.shard_grants SET opened_at = now() "
                    "WHERE child_run_id = :id"
                ),
                {"id": flow_run_id},
            )
            active = {
                r[0]: r[1]
                for r in await session.execute(
                    text(
                        "SELECT id, name FROM public.clients "
                        "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'active'"
                    ),
                    {"ids": list(row.client_ids)},
                )
            }
    except AccessDenied as denied:
        await _audit(
            settings,
            flow_run_id=flow_run_id,
            actor=None,
            client_ids=[None],
            action=action,
            outcome="denied",
            reason=str(denied),
        )
        raise
    actor = Actor(ActorKind(row.actor_kind), row.actor_id)
    contexts = [
        TenantContext(actor, client_id, active[client_id], flow_run_id, seal=_SEAL)
        for client_id in row.client_ids
        if client_id in active
    ]
    await _audit(
        settings,
        flow_run_id=flow_run_id,
        actor=actor,
        client_ids=[c.client_id for c in contexts] or [None],
        action=action,
        outcome="allowed",
        reason=f"shard {row.shard} of flow run {row.parent_run_id}, for {actor.kind.value}",
    )
    return ShardGrant(
        child_run_id=flow_run_id,
        parent_run_id=row.parent_run_id,
        shard=row.shard,
        day=row.day,
        contexts=contexts,
        inactive=[c for c in row.client_ids if c not in active],
    )


@dataclass(frozen=True)
class ShardResult:
    finished: bool
    ok_clients: int
    events: int
    failed_client_ids: list[UUID]


async def record_shard_result(
    grant: ShardGrant,
    *,
    ok_clients: int,
    events: int,
    failed_client_ids: Sequence[UUID],
    settings: Settings | None = None,
) -> None:
    """The shard's outcome, for its parent to read back."""
    async with _guard_unit(settings or get_settings()) as session:
        await session.execute(
            text(
                "UPDATE tenantflow_private.shard_grants SET finished_at = now(), "
                "ok_clients = :ok, events = :events, "
                "failed_client_ids = CAST(:failed AS uuid[]) WHERE child_run_id = :id"
            ),
            {
                "id": grant.child_run_id,
                "ok": ok_clients,
                "events": events,
                "failed": list(failed_client_ids),
            },
        )


async def read_shard_result(child_run_id: UUID, *, settings: Settings | None = None) -> ShardResult:
    """What a shard run recorded (`finished` False: it never got that far)."""
    async with _guard_unit(settings or get_settings()) as session:
        row = (
            await session.execute(
                text(
                    "SELECT finished_at IS NOT NULL, coalesce(ok_clients, 0), "
                    "coalesce(events, 0), coalesce(failed_client_ids, '{}') "
                    "FROM tenantflow_private.shard_grants WHERE child_run_id = :id"
                ),
                {"id": child_run_id},
            )
        ).one_or_none()
    if row is None:
        return ShardResult(False, 0, 0, [])
    return ShardResult(bool(row[0]), int(row[1]), int(row[2]), list(row[3]))


# --------------------------------------------------------------------------- tenant tasks


@asynccontextmanager
async def tenant_session(
    ctx: TenantContext, *, settings: Settings | None = None
) -> AsyncIterator[Executor]:
    """The only way tenant tasks reach the database: one transaction under the actor's role.

    Users get `request.jwt.claims` (their verified claims) and `SET LOCAL ROLE
    authenticated`, so row-level security applies as on Supabase's Data API. The
    scheduler and operators get `service_role`; their tasks still filter by
    `ctx.client_id`.
    """
    if not isinstance(ctx, TenantContext) or ctx.seal is not _SEAL:
        raise AccessDenied("tenant_session needs a TenantContext from the tenant guard")
    claims = ctx.actor.claims
    if ctx.actor.kind is not ActorKind.USER or claims is None:
        local, role = {"request.jwt.claims": SERVICE_CLAIMS}, SERVICE_ROLE
    else:
        # NOTE: Supabase's auth.uid() reads request.jwt.claim.sub before the claims
        # document (PostgREST sets both); both are set, so it sees this user either way.
        local = {
            "request.jwt.claims": claims.claims_json(),
            "request.jwt.claim.sub": str(claims.sub),
        }
        role = "authenticated"
    async with (
        transaction_slot(),
        unit_of_work(local_settings=local, role=role, settings=settings) as session,
    ):
        yield session
