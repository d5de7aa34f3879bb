"""The tenant guard: who may touch which client's data, settled once per run.

A flow that touches client data calls `authorize_run()` first. It opens the run's
sealed access token (`tenantflow.tenancy.run_token`), settles the run's **actor**,
checks it against the flow's mode and the clients asked for, writes every decision to
`audit_log`, and hands back one `TenantContext` per client. `authorize_token()` states
the same decision for a plain token already in hand.

| actor | how it is recognised |
|---|---|
| scheduler | no token; the flow run, read from the Prefect API, was created by a schedule |
|           | that this project's `prefect.yaml` declares, with exactly its parameters   |
| operator | a verified token whose `app_metadata` grants `tenantflow_operator`, |
|          | confirmed in `auth.users` at run time and with Supabase Auth        |
| user | any other verified token |

Service-mode flows admit the scheduler and operators; operator-mode flows (`migrate`)
admit operators only; user-mode flows admit a user (an operator too, acting with their
own token) with an accepted membership in an active client, optionally of a minimum
role. Everything else is denied before any tenant query, and the run fails with the
reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Literal
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext
from pydantic import SecretStr
from sqlalchemy import bindparam, text

from tenantflow.auth import (
    AuthError,
    AuthServiceUnavailable,
    VerifiedClaims,
    app_metadata_grants_operator,
    verify_access_token,
)
from tenantflow.db import Executor, warm_up
from tenantflow.project import DeployError, declared_deployment, slot_of_key
from tenantflow.schema import MEMBER_ROLES
from tenantflow.sealing import canonical_parameters
from tenantflow.settings import Settings, get_settings
from tenantflow.tenancy.actors import _SEAL, AccessDenied, Actor, ActorKind, TenantContext
from tenantflow.tenancy.run_token import open_run_token
from tenantflow.tenancy.sessions import guard_unit

__all__ = [
    "AUTH_ATTEMPTS",
    "Mode",
    "RunArguments",
    "audit",
    "authorize_run",
    "authorize_token",
    "current_flow_run_id",
    "current_flow_run_id_or_none",
    "received_arguments",
    "require_membership",
]

Mode = Literal["user", "service", "operator"]


# --------------------------------------------------------------------------- audit


_AUDIT = text(
    "INSERT INTO public.audit_log "
    "(flow_run_id, actor_kind, actor_id, client_id, action, outcome, reason) "
    "SELECT :flow_run_id, :actor_kind, :actor_id, c, :action, :outcome, :reason "
    "FROM unnest(CAST(:client_ids AS uuid[])) AS c"
)


async def audit(
    settings: Settings,
    *,
    flow_run_id: UUID | None,
    actor: Actor | None,
    client_ids: Sequence[UUID | None],
    action: str,
    outcome: Literal["allowed", "denied"],
    reason: str | None,
    session: Executor | None = None,
) -> None:
    """Append one row per client to `audit_log`: in `session`'s transaction (the
    admission's own, so the decision and its record commit together), or in one of its
    own."""
    values = {
        "flow_run_id": flow_run_id,
        "actor_kind": (actor.kind if actor else ActorKind.USER).value,
        "actor_id": actor.user_id if actor else None,
        "client_ids": list(client_ids) or [None],
        "action": action,
        "outcome": outcome,
        "reason": reason,
    }
    if session is not None:
        await session.execute(_AUDIT, values)
        return
    async with guard_unit(settings) as own:
        await own.execute(_AUDIT, values)


async def _read_flow_run(flow_run_id: UUID) -> FlowRun:
    async with get_client() as client:
        return await client.read_flow_run(flow_run_id)


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunArguments:
    """The arguments a flow function received (its defaults applied), and those defaults.

    The guard decides on these, never on the run's stored parameters: whoever reaches the
    Prefect API can change those at any time, even while the run is Running.
    """

    received: Mapping[str, Any] = field(repr=False)
    defaults: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, fn: Callable[..., Any], parameters: Mapping[str, Any]) -> RunArguments:
        """`fn`'s arguments when called with `parameters`, as Prefect's engine calls it."""
        signature = inspect.signature(fn)
        try:
            bound = signature.bind_partial(**parameters)
        except TypeError:
            raise AccessDenied("this run's parameters do not fit the flow's signature") from None
        bound.apply_defaults()
        defaults = {
            name: parameter.default
            for name, parameter in signature.parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        return cls(dict(bound.arguments), defaults)


def received_arguments(flow_run_id: UUID | None) -> RunArguments | None:
    """The arguments the flow of the current flow run received, if it is `flow_run_id`."""
    context = FlowRunContext.get()
    if (
        context is None
        or context.flow_run is None
        or context.flow is None
        or context.flow_run.id != flow_run_id
    ):
        return None
    return RunArguments.of(context.flow.fn, context.parameters or {})


_TOKEN_ONLY: Final = frozenset({"access_token"})
_FINAL_STATES: Final = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


async def _read_run(flow_run_id: UUID | None, settings: Settings) -> _Run:
    """The flow run and the states it went through, read at once while the database's
    first connection opens (the guard's first transaction comes next)."""
    if flow_run_id is None:
        return _Run(None, [])

    async def states() -> list[State]:
        async with get_client() as client:
            return await client.read_flow_run_states(flow_run_id)

    flow_run, history, _ = await asyncio.gather(
        _read_flow_run(flow_run_id), states(), warm_up(settings)
    )
    return _Run(flow_run, history)


@dataclass(frozen=True)
class _Run:
    flow_run: FlowRun | None
    states: list[State]


def _first_execution(states: Sequence[State], *, sealed: bool) -> None:
    """Refuse a run that already reached a final state once and was put back through the
    Prefect API (re-stated to Scheduled, retried from the UI): a run is admitted for one
    execution. Prefect keeps every state a run went through, and no API call removes one.

    Raises:
        AccessDenied: the run ended before.
    """
    ended = [state for state in states if state.type.value in _FINAL_STATES]
    if ended:
        first = ended[0]
        raise AccessDenied(
            f"this flow run already ended once ({first.name} at "
            f"{first.timestamp:%Y-%m-%d %H:%M:%S} UTC) and was put back to run again; a run "
            "is admitted for one execution only: start a new run"
            + (" with a freshly sealed access token" if sealed else "")
        )


# --------------------------------------------------------------------------- actor


async def _operator_confirmed(settings: Settings, user_id: UUID) -> bool:
    """Read the operator grant from `auth.users`: a token's `app_metadata` is stale."""
    async with guard_unit(settings) as session:
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
    settings: Settings,
    access_token: SecretStr,
    allow_anonymous: bool,
    *,
    strict: bool | None = None,
) -> VerifiedClaims:
    """`verify_access_token`, retried a few times while Supabase Auth is unreachable (a
    transient failure); every other refusal is final at once."""
    for attempt in range(1, AUTH_ATTEMPTS):
        try:
            return await verify_access_token(
                access_token, settings=settings, allow_anonymous=allow_anonymous, strict=strict
            )
        except AuthServiceUnavailable:
            await asyncio.sleep(2 ** (attempt - 1))
    try:
        return await verify_access_token(
            access_token, settings=settings, allow_anonymous=allow_anonymous, strict=strict
        )
    except AuthServiceUnavailable as error:
        raise AuthServiceUnavailable(
            f"{error.message} ({AUTH_ATTEMPTS} attempts over "
            f"{2 ** (AUTH_ATTEMPTS - 1) - 1} s); start the run again later"
        ) from None


async def _verify_actor(
    settings: Settings, access_token: SecretStr, *, allow_anonymous: bool
) -> Actor:
    try:
        claims = await _verified(settings, access_token, allow_anonymous)
    except AuthError as error:
        raise AccessDenied(f"access token refused: {error}") from None
    if not claims.token_grants_operator:
        return Actor(ActorKind.USER, claims.sub, claims.email, claims)
    # NOTE: an operator may act on every client: ask Supabase Auth too, so a signed-out
    # session or a deleted user cannot use a still-unexpired token. Asked while
    # `auth.users` is read; its answer counts only if the grant is still there (without
    # it the actor is an ordinary user, and Auth is not waited for).
    strict = asyncio.ensure_future(_verified(settings, access_token, allow_anonymous, strict=True))
    try:
        confirmed = await _operator_confirmed(settings, claims.sub)
    except BaseException:
        strict.cancel()
        raise
    if not confirmed:
        strict.cancel()
        with contextlib.suppress(BaseException):
            await strict
        return Actor(ActorKind.USER, claims.sub, claims.email, claims)
    try:
        claims = await strict
    except AuthError as error:
        raise AccessDenied(f"operator token refused: {error}") from None
    return Actor(ActorKind.OPERATOR, claims.sub, claims.email, claims)


_NO_TOKEN_REASON = "no access_token: " + (
    "only runs created by the project's own schedule may run without one; paste a "
    "sealed access token (tenantflow seal) into the run's access_token"
)


async def _scheduler(
    settings: Settings, flow_run: FlowRun | None, arguments: RunArguments | None
) -> Actor:
    """The scheduler, if the project's own declared schedule created this run as declared,
    and it runs now, at its slot, with the declared parameters.

    `auto_scheduled`, `created_by` and the idempotency key (which names the slot the
    schedule fired for) cannot be set or changed by an API client; the schedule they point
    at, the deployment's parameters, the run's stored parameters and its scheduled time all
    can, so each is compared with the worker's own `prefect.yaml`, the arguments the flow
    actually received, and the clock.
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
    arguments = _needed(arguments)
    # NOTE: every parameter counts here (the clients too), only the token aside.
    received = canonical_parameters(arguments.received, leave_out=_TOKEN_ONLY)
    wanted = canonical_parameters(
        {**arguments.defaults, **declared.parameters, **expected.parameters},
        leave_out=_TOKEN_ONLY,
    )
    if received != wanted:
        changed = sorted(
            name for name in set(received) | set(wanted) if received.get(name) != wanted.get(name)
        )
        raise AccessDenied(
            f"this scheduled run was started with other parameters than schedule "
            f"{expected.slug}'s in prefect.yaml ({', '.join(changed)}); a run with other "
            "parameters needs an operator's sealed access token"
        )
    slot = _slot(flow_run, deployment.id, schedule.id)
    now = datetime.now(UTC)
    early, late = (slot - now).total_seconds(), (now - slot).total_seconds()
    if early > settings.schedule_early_s or late > settings.schedule_late_s:
        when = f"{early:.0f} s before" if early > 0 else f"{late:.0f} s after"
        raise AccessDenied(
            f"this scheduled run is for the {slot:%Y-%m-%d %H:%M %Z} slot of schedule "
            f"{expected.slug} but started {when} it; the scheduler runs only at its slot "
            f"(from {settings.schedule_early_s:.0f} s before to "
            f"{settings.schedule_late_s:.0f} s after); an operator's sealed access token "
            "starts it at another time"
        )
    return Actor(ActorKind.SCHEDULER, slot=slot)


def _slot(flow_run: FlowRun, deployment_id: UUID, schedule_id: UUID) -> datetime:
    """The slot the schedule fired for, from the idempotency key Prefect's scheduler gave
    the run (`tenantflow.project.scheduler_key`): API clients cannot change a run's key,
    as they can change its scheduled time."""
    slot = slot_of_key(
        flow_run.idempotency_key, deployment_id=deployment_id, schedule_id=schedule_id
    )
    if slot is None:
        raise AccessDenied(
            "this scheduled run carries no slot of its schedule (its idempotency key is not "
            "the scheduler's); only runs the scheduler created may run without an access_token"
        )
    return slot


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


def current_flow_run_id_or_none() -> UUID | None:
    """The id of the flow run this code runs in, or None outside a flow run."""
    context = FlowRunContext.get()
    return context.flow_run.id if context and context.flow_run else None


def current_flow_run_id() -> UUID:
    """The id of the flow run this code runs in.

    Raises:
        RuntimeError: outside a flow run.
    """
    flow_run_id = current_flow_run_id_or_none()
    if flow_run_id is None:
        raise RuntimeError("not inside a flow run")
    return flow_run_id


def _secret(access_token: SecretStr | str | None) -> SecretStr | None:
    """The token as a `SecretStr` from here on; an empty one is no token."""
    if isinstance(access_token, str):
        access_token = SecretStr(access_token)
    return access_token or None


async def authorize_run(
    *,
    action: str,
    mode: Mode,
    access_token: SecretStr | str | None,
    client_ids: Sequence[UUID] | None,
    min_role: str | None = None,
    allow_anonymous: bool = False,
    flow_run_id: UUID | None = None,
    arguments: RunArguments | None = None,
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
        arguments: what the flow function received; by default read from the current
            flow run's context (Prefect's engine keeps there what it called the function
            with). Only code outside the flow run (tests) passes them.

    Raises:
        AccessDenied: with the reason; the decision is already in `audit_log`.
    """
    settings = settings or get_settings()
    flow_run_id = flow_run_id or current_flow_run_id_or_none()
    run = await _read_run(flow_run_id, settings)
    flow_run = run.flow_run
    arguments = arguments or received_arguments(flow_run_id)

    async def open_token(
        access_token: SecretStr, verify: Callable[[SecretStr], Awaitable[Actor]]
    ) -> Actor:
        # NOTE: outside any flow run there is nothing to compare; the seal is refused
        # for that reason (`open_run_token`), before its parameters are looked at.
        received = RunArguments({}) if flow_run is None else _needed(arguments)
        return await open_run_token(
            settings,
            access_token,
            flow_run,
            action,
            client_ids,
            parameters=received.received,
            defaults=received.defaults,
            verify=verify,
        )

    return await _decide(
        settings,
        action,
        mode,
        _secret(access_token),
        open_token,
        client_ids,
        min_role,
        allow_anonymous,
        run,
        arguments,
    )


def _needed(arguments: RunArguments | None) -> RunArguments:
    if arguments is None:
        raise AccessDenied(
            "the guard decides on the arguments the flow itself received: it runs inside "
            "the flow run it authorizes"
        )
    return arguments


async def authorize_token(
    *,
    action: str,
    mode: Mode,
    access_token: SecretStr | str | None,
    client_ids: Sequence[UUID] | None,
    min_role: str | None = None,
    allow_anonymous: bool = False,
    flow_run_id: UUID | None = None,
    arguments: RunArguments | None = None,
    settings: Settings | None = None,
) -> list[TenantContext]:
    """The guard's decision for a plain access token that is already in hand.

    Flows never call this: their token arrives sealed through Prefect (`authorize_run`).
    It serves code that holds a user's token without Prefect in between, and states the
    decision table on its own. Arguments as for `authorize_run`.
    """
    settings = settings or get_settings()
    flow_run_id = flow_run_id or current_flow_run_id_or_none()
    run = await _read_run(flow_run_id, settings)

    async def as_given(
        access_token: SecretStr, verify: Callable[[SecretStr], Awaitable[Actor]]
    ) -> Actor:
        return await verify(access_token)

    return await _decide(
        settings,
        action,
        mode,
        _secret(access_token),
        as_given,
        client_ids,
        min_role,
        allow_anonymous,
        run,
        arguments or received_arguments(flow_run_id),
    )


async def _decide(
    settings: Settings,
    action: str,
    mode: Mode,
    access_token: SecretStr | None,
    open_token: Callable[[SecretStr, Callable[[SecretStr], Awaitable[Actor]]], Awaitable[Actor]],
    client_ids: Sequence[UUID] | None,
    min_role: str | None,
    allow_anonymous: bool,
    run: _Run,
    arguments: RunArguments | None,
) -> list[TenantContext]:
    flow_run = run.flow_run
    flow_run_id = flow_run.id if flow_run is not None else None
    actor: Actor | None = None
    asked: list[UUID | None] = list(client_ids) if client_ids is not None else [None]
    try:
        if flow_run is not None:
            _first_execution(run.states, sealed=access_token is not None)
        if access_token is not None:
            actor = await open_token(
                access_token, partial(_verify_actor, settings, allow_anonymous=allow_anonymous)
            )
        else:
            actor = await _scheduler(settings, flow_run, arguments)
        admitted = actor

        async def allowed(session: Executor | None, ids: Sequence[UUID]) -> None:
            await audit(
                settings,
                flow_run_id=flow_run_id,
                actor=admitted,
                client_ids=list(ids) or [None],
                action=action,
                outcome="allowed",
                reason=f"{admitted.kind.value} in {mode} mode",
                session=session,
            )

        return await _admit(settings, actor, mode, client_ids, min_role, flow_run_id, allowed)
    except AccessDenied as denied:
        await audit(
            settings,
            flow_run_id=flow_run_id,
            actor=actor,
            client_ids=asked,
            action=action,
            outcome="denied",
            reason=str(denied),
        )
        raise


async def _admit(
    settings: Settings,
    actor: Actor,
    mode: Mode,
    client_ids: Sequence[UUID] | None,
    min_role: str | None,
    flow_run_id: UUID | None,
    allowed: Callable[[Executor | None, Sequence[UUID]], Awaitable[None]],
) -> list[TenantContext]:
    """The contexts for `actor` in `mode`; the decision is recorded (`allowed`) in the
    transaction that read what it rests on, so both commit together."""
    if mode == "operator":
        if actor.kind is not ActorKind.OPERATOR:
            raise AccessDenied(
                f"{actor.describe()} may not start this flow: only a tenantflow operator "
                "(app_metadata role tenantflow_operator) may"
            )
        await allowed(None, [])
        return []
    if mode == "service":
        if actor.kind is ActorKind.USER:
            raise AccessDenied(
                f"{actor.describe()} may not start this service flow: it runs on its "
                "schedule or by an operator (app_metadata role tenantflow_operator)"
            )
        async with guard_unit(settings) as session:
            clients = await _active_clients(session, client_ids)
            await allowed(session, list(clients))
        return [
            TenantContext(actor, client_id, name, flow_run_id, seal=_SEAL)
            for client_id, name in clients.items()
        ]
    if actor.kind is ActorKind.SCHEDULER or actor.user_id is None:
        raise AccessDenied("this flow acts for a user: it needs that user's access_token")
    if client_ids is None or len(client_ids) != 1:
        raise AccessDenied("this flow acts on exactly one client")
    async with guard_unit(settings) as session:
        membership = await require_membership(
            session, user_id=actor.user_id, client_id=client_ids[0], min_role=min_role
        )
        await allowed(session, [client_ids[0]])
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
