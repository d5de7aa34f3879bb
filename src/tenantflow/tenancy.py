"""The tenant guard (DESIGN.md §2): who may touch which client's data, settled once per run.

A flow that touches client data calls `authorize_run()` first. It settles the run's
**actor**, checks it against the flow's mode and the clients asked for, writes every
decision to `audit_log`, and hands back one sealed `TenantContext` per client. Tenant
tasks (`@tenant_task`) refuse to run without one, and `tenant_session(ctx)` is their
only way to a database session: for a user it carries the verified claims and
`SET LOCAL ROLE authenticated`, so row-level security checks the membership a second
time inside Postgres; for the scheduler and operators it runs as `service_role`.

| actor | how it is recognised |
|---|---|
| scheduler | no token, and the flow run, read from the Prefect API, has `auto_scheduled` |
| operator | a verified token whose `app_metadata` grants `tenantflow_operator`, |
|          | confirmed in `auth.users.raw_app_meta_data` at run time          |
| user | any other verified token |

Service-mode flows admit the scheduler and operators; user-mode flows admit a user
(an operator too, acting with their own token) with an accepted membership in an
active client, optionally of a minimum role. Everything else is denied before any
tenant query, and the run fails with the reason.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Concatenate, Final, Literal, ParamSpec, TypeVar
from uuid import UUID

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State, TaskRun
from prefect.context import FlowRunContext
from prefect.tasks import exponential_backoff
from pydantic import SecretStr
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from tenantflow.auth import AuthError, VerifiedClaims, app_metadata_grants_operator
from tenantflow.auth import verify_access_token as _verify_access_token
from tenantflow.budget import transaction_slot
from tenantflow.db import is_transient_database_error, unit_of_work
from tenantflow.schema import MEMBER_ROLES
from tenantflow.settings import Settings, get_settings

__all__ = [
    "REDACTED",
    "AccessDenied",
    "Actor",
    "ActorKind",
    "TenantContext",
    "authorize_run",
    "redact_stored_access_token",
    "redact_token_on_failure",
    "require_membership",
    "tenant_session",
    "tenant_task",
]

log = logging.getLogger("tenantflow.tenancy")

#: What a verified run's stored `access_token` parameter is replaced with.
REDACTED: Final = "[redacted by tenantflow after verification]"
SERVICE_CLAIMS: Final = json.dumps({"role": "service_role"})

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


class AccessDenied(Exception):
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
    async with unit_of_work(settings=settings) as session:
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


# --------------------------------------------------------------------------- actor


async def _read_flow_run(flow_run_id: UUID) -> FlowRun:
    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


async def _redact_token_parameter(flow_run: FlowRun) -> None:
    """Replace the stored `access_token` parameter: Prefect keeps parameters in clear."""
    stored = flow_run.parameters.get("access_token")
    if stored in (None, "", REDACTED):
        return
    parameters = {**flow_run.parameters, "access_token": REDACTED}
    async with get_client() as client:
        await client.update_flow_run(flow_run.id, parameters=parameters)


async def redact_stored_access_token(flow_run_id: UUID | None = None) -> None:
    """Replace this run's stored `access_token` parameter with `REDACTED`.

    Flows call it first thing, before anything that could fail or wait (database slots,
    the guard), so no path leaves a token in the run's stored parameters.
    """
    flow_run_id = flow_run_id or _current_flow_run_id()
    if flow_run_id is not None:
        await _redact_token_parameter(await _read_flow_run(flow_run_id))


async def redact_token_on_failure(flow: Any, flow_run: FlowRun, state: State[Any] | None) -> None:
    """Flow hook (`on_failure`, `on_crashed`): runs that fail before their first step, on
    invalid parameters say, still get their stored token removed."""
    await _redact_token_parameter(flow_run)


async def _operator_confirmed(settings: Settings, user_id: UUID) -> bool:
    """Read the operator grant from `auth.users`: a token's `app_metadata` is stale."""
    async with unit_of_work(settings=settings) as session:
        row = (
            await session.execute(
                text(
                    "SELECT raw_app_meta_data FROM auth.users WHERE id = :id AND deleted_at IS NULL"
                ),
                {"id": user_id},
            )
        ).one_or_none()
    return row is not None and app_metadata_grants_operator(row[0])


async def _settle_actor(
    settings: Settings,
    token: str | None,
    flow_run: FlowRun | None,
    allow_anonymous: bool,
) -> Actor:
    if token:
        if token == REDACTED:
            raise AccessDenied(
                "this run's access_token was removed after it was first verified; "
                "start a new run with a fresh token instead of retrying this one"
            )
        try:
            claims = await _verify_access_token(
                token, settings=settings, allow_anonymous=allow_anonymous
            )
        except AuthError as error:
            raise AccessDenied(f"access token refused: {error}") from None
        kind = ActorKind.USER
        if claims.token_grants_operator and await _operator_confirmed(settings, claims.sub):
            # NOTE: an operator may act on every client: ask Supabase Auth too, so a
            # signed-out session or a deleted user cannot use a still-unexpired token.
            try:
                claims = await _verify_access_token(
                    token, settings=settings, allow_anonymous=allow_anonymous, strict=True
                )
            except AuthError as error:
                raise AccessDenied(f"operator token refused: {error}") from None
            kind = ActorKind.OPERATOR
        return Actor(kind, claims.sub, claims.email, claims)
    if flow_run is not None and flow_run.auto_scheduled:
        return Actor(ActorKind.SCHEDULER)
    raise AccessDenied(
        "no access_token: only runs created by the deployment's schedule may run without "
        "one; paste a Supabase access token into the run's access_token parameter"
    )


# --------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class _Membership:
    client_name: str
    role: str


async def require_membership(
    session: AsyncSession, *, user_id: UUID, client_id: UUID, min_role: str | None = None
) -> _Membership:
    """An accepted membership of `user_id` in the active client `client_id`.

    Raises:
        AccessDenied: no membership, not accepted yet, client not active, role too low.
    """
    if min_role is not None and min_role not in MEMBER_ROLES:
        raise ValueError(f"unknown membership role {min_role!r}; one of {MEMBER_ROLES}")
    row = (
        await session.execute(
            text(
                "SELECT c.name, c.status, m.role, m.accepted_at IS NOT NULL "
                "FROM public.clients AS c "
                "LEFT JOIN public.memberships AS m "
                "  ON m.client_id = c.id AND m.user_id = :user_id "
                "WHERE c.id = :client_id"
            ),
            {"user_id": user_id, "client_id": client_id},
        )
    ).one_or_none()
    if row is None:
        raise AccessDenied(f"client {client_id} does not exist")
    name, status, role, accepted = row
    if role is None:
        raise AccessDenied(f"user {user_id} has no membership in client {client_id}")
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


async def _active_clients(
    session: AsyncSession, client_ids: Sequence[UUID] | None
) -> dict[UUID, str]:
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


async def authorize_run(
    *,
    action: str,
    mode: Literal["user", "service"],
    access_token: SecretStr | str | None,
    client_ids: Sequence[UUID] | None,
    min_role: str | None = None,
    allow_anonymous: bool = False,
    flow_run_id: UUID | None = None,
    settings: Settings | None = None,
) -> list[TenantContext]:
    """Settle the actor, check it, audit the decision, and issue the tenant contexts.

    Args:
        action: what the run does, for the audit log (e.g. the flow's name).
        mode: `user` flows act for one user in one client (membership required);
            `service` flows act for the platform (scheduler or operator only).
        access_token: the run's `access_token` parameter, if any.
        client_ids: the clients asked for; `None` in service mode means every active
            client. User mode takes exactly one.
        min_role: user mode: the lowest membership role allowed.
        flow_run_id: defaults to the current flow run.

    Raises:
        AccessDenied: with the reason; the decision is already in `audit_log`.
    """
    settings = settings or get_settings()
    flow_run_id = flow_run_id or _current_flow_run_id()
    flow_run = await _read_flow_run(flow_run_id) if flow_run_id else None
    raw = access_token.get_secret_value() if isinstance(access_token, SecretStr) else access_token
    if raw and flow_run is not None:
        # NOTE: first of all, so a refused token is not kept in clear either.
        await _redact_token_parameter(flow_run)

    actor: Actor | None = None
    asked: list[UUID | None] = list(client_ids) if client_ids is not None else [None]
    try:
        actor = await _settle_actor(settings, raw, flow_run, allow_anonymous)
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
        client_ids=[c.client_id for c in contexts],
        action=action,
        outcome="allowed",
        reason=f"{actor.kind.value} in {mode} mode",
    )
    return contexts


async def _admit(
    settings: Settings,
    actor: Actor,
    mode: Literal["user", "service"],
    client_ids: Sequence[UUID] | None,
    min_role: str | None,
    flow_run_id: UUID | None,
) -> list[TenantContext]:
    if mode == "service":
        if actor.kind is ActorKind.USER:
            raise AccessDenied(
                f"{actor.describe()} may not start this service flow: it runs on its "
                "schedule or by an operator (app_metadata role tenantflow_operator)"
            )
        async with unit_of_work(settings=settings) as session:
            clients = await _active_clients(session, client_ids)
        return [
            TenantContext(actor, client_id, name, flow_run_id, seal=_SEAL)
            for client_id, name in clients.items()
        ]
    if actor.kind is ActorKind.SCHEDULER or actor.user_id is None:
        raise AccessDenied("this flow acts for a user: it needs that user's access_token")
    if client_ids is None or len(client_ids) != 1:
        raise AccessDenied("this flow acts on exactly one client")
    async with unit_of_work(settings=settings) as session:
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


# --------------------------------------------------------------------------- tenant tasks


@asynccontextmanager
async def tenant_session(
    ctx: TenantContext, *, settings: Settings | None = None
) -> AsyncIterator[AsyncSession]:
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
        local, role = {"request.jwt.claims": SERVICE_CLAIMS}, "service_role"
    else:
        local, role = {"request.jwt.claims": claims.claims_json()}, "authenticated"
    async with (
        transaction_slot(),
        unit_of_work(local_settings=local, role=role, settings=settings) as session,
    ):
        yield session


async def _retry_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only transient database faults: never auth, validation or logic errors."""
    outcome = await state.aresult(raise_on_failure=False)
    return isinstance(outcome, BaseException) and is_transient_database_error(outcome)


def tenant_task(
    *, name: str, retries: int = 3, timeout_seconds: float = 300
) -> Callable[
    [Callable[Concatenate[TenantContext, P], Awaitable[R]]],
    Task[Concatenate[TenantContext, P], Coroutine[Any, Any, R]],
]:
    """Make an async function of `(ctx: TenantContext, ...)` a tenant task.

    The task refuses to run without a guard-issued context, is named after its client,
    never persists or caches its result (it may hold client data), and retries only
    transient database faults, with exponential backoff and jitter.
    """

    def decorate(
        fn: Callable[Concatenate[TenantContext, P], Awaitable[R]],
    ) -> Task[Concatenate[TenantContext, P], Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def guarded(ctx: TenantContext, *args: P.args, **kwargs: P.kwargs) -> R:
            if not isinstance(ctx, TenantContext) or ctx.seal is not _SEAL:
                raise AccessDenied(f"tenant task {name} needs a TenantContext from the guard")
            get_run_logger().debug("%s for %s as %s", name, ctx.label, ctx.actor.describe())
            return await fn(ctx, *args, **kwargs)

        return task(
            name=name,
            task_run_name=f"{name}[{{ctx.client_name}}]",
            persist_result=False,
            cache_policy=NO_CACHE,
            retries=retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=2),
            retry_jitter_factor=0.5,
            retry_condition_fn=_retry_transient,
            timeout_seconds=timeout_seconds,
            # NOTE: no tags: every tagged task run asks the API for tag concurrency slots
            # (measured: several times slower, and 503s under load). The name says the client.
        )(guarded)

    return decorate
