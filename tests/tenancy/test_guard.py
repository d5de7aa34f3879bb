"""The tenant guard's decision table, its audit trail, and RLS as the second line."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.schedules import IntervalSchedule
from pydantic import SecretStr
from sqlalchemy import text

from tenantflow.db import dispose_engines
from tenantflow.localstack.auth_server import set_operator
from tenantflow.tenancy import (
    _SEAL,
    REDACTED,
    AccessDenied,
    Actor,
    ActorKind,
    TenantContext,
    authorize_run,
    tenant_session,
)
from tests.tenancy.conftest import EVENTS_PER_CLIENT, World

pytestmark = pytest.mark.stack


@pytest.fixture(autouse=True)
async def _dispose() -> AsyncIterator[None]:
    yield
    await dispose_engines()


async def _audit_rows(world: World, actor_id: uuid.UUID | None, action: str) -> list[tuple]:
    rows = await world.sql(
        "fetch",
        "SELECT actor_kind, client_id, outcome, reason FROM public.audit_log "
        "WHERE action = $1 AND actor_id IS NOT DISTINCT FROM $2 ORDER BY id",
        action,
        actor_id,
    )
    return [tuple(r) for r in rows]


async def _user_decision(world: World, who: str, client: str, **options) -> TenantContext:
    contexts = await authorize_run(
        action=f"test-{uuid.uuid4().hex[:6]}",
        mode="user",
        access_token=SecretStr(await world.token(who)),
        client_ids=[world.clients[client]],
        **options,
    )
    assert len(contexts) == 1
    return contexts[0]


@pytest.mark.parametrize(
    ("who", "client", "reason"),
    [
        ("outsider", "a", "has no membership"),
        ("pending_a", "a", "has not been accepted"),
        ("member_b", "a", "has no membership"),
        ("member_s", "s", "is suspended, not active"),
    ],
)
async def test_user_mode_denials(world: World, who: str, client: str, reason: str) -> None:
    action = f"deny-{who}-{uuid.uuid4().hex[:6]}"
    with pytest.raises(AccessDenied, match=reason):
        await authorize_run(
            action=action,
            mode="user",
            access_token=await world.token(who),
            client_ids=[world.clients[client]],
        )
    rows = await _audit_rows(world, world.users[who], action)
    assert rows == [("user", world.clients[client], "denied", rows[0][3])]
    assert reason in rows[0][3]


async def test_accepted_membership_is_allowed_and_audited(world: World) -> None:
    ctx = await _user_decision(world, "member_a", "a")
    assert ctx.actor.kind is ActorKind.USER
    assert ctx.actor.user_id == world.users["member_a"]
    assert (ctx.client_id, ctx.membership_role) == (world.clients["a"], "member")
    outcome = await world.sql(
        "fetchval",
        "SELECT outcome FROM public.audit_log WHERE actor_id = $1 ORDER BY id DESC LIMIT 1",
        world.users["member_a"],
    )
    assert outcome == "allowed"


async def test_minimum_role(world: World) -> None:
    await _user_decision(world, "member_a", "a", min_role="member")
    with pytest.raises(AccessDenied, match=r"is viewer in client .* needs member or above"):
        await _user_decision(world, "viewer_a", "a", min_role="member")


async def test_membership_revoked_between_two_runs(world: World) -> None:
    await _user_decision(world, "member_b", "b")
    await world.sql(
        "execute", "DELETE FROM public.memberships WHERE user_id = $1", world.users["member_b"]
    )
    with pytest.raises(AccessDenied, match="has no membership"):
        await _user_decision(world, "member_b", "b")


async def test_suspension_between_two_runs(world: World) -> None:
    await _user_decision(world, "member_a", "a")
    await world.sql(
        "execute",
        "UPDATE public.clients SET status = 'suspended' WHERE id = $1",
        world.clients["a"],
    )
    with pytest.raises(AccessDenied, match="suspended"):
        await _user_decision(world, "member_a", "a")


async def test_user_mode_takes_exactly_one_client(world: World) -> None:
    token = await world.token("member_a")
    with pytest.raises(AccessDenied, match="exactly one client"):
        await authorize_run(
            action="t",
            mode="user",
            access_token=token,
            client_ids=[world.clients["a"], world.clients["b"]],
        )


async def test_forged_token_is_denied_without_the_token_in_the_reason(world: World) -> None:
    token = await world.token("member_a")
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[::-1]}"
    with pytest.raises(AccessDenied, match="access token refused") as caught:
        await authorize_run(
            action="t", mode="user", access_token=forged, client_ids=[world.clients["a"]]
        )
    for text_ in (str(caught.value), repr(caught.value)):
        assert forged not in text_ and signature not in text_ and payload not in text_


async def test_no_token_outside_a_scheduled_run_is_denied(world: World) -> None:
    with pytest.raises(AccessDenied, match="no access_token"):
        await authorize_run(action="t", mode="service", access_token=None, client_ids=None)


async def test_service_mode_refuses_plain_users(world: World) -> None:
    with pytest.raises(AccessDenied, match="may not start this service flow"):
        await authorize_run(
            action="t",
            mode="service",
            access_token=await world.token("member_a"),
            client_ids=None,
        )


async def test_operator_runs_service_flows_for_the_clients_asked(world: World) -> None:
    contexts = await authorize_run(
        action="t",
        mode="service",
        access_token=await world.token("operator"),
        client_ids=[world.clients["a"], world.clients["b"]],
    )
    assert {c.client_id for c in contexts} == {world.clients["a"], world.clients["b"]}
    assert all(c.actor.kind is ActorKind.OPERATOR for c in contexts)


async def test_operator_service_mode_without_clients_means_every_active_client(
    world: World,
) -> None:
    contexts = await authorize_run(
        action="t", mode="service", access_token=await world.token("operator"), client_ids=None
    )
    ids = {c.client_id for c in contexts}
    assert {world.clients["a"], world.clients["b"]} <= ids
    assert world.clients["s"] not in ids


async def test_service_mode_refuses_inactive_or_unknown_clients(world: World) -> None:
    token = await world.token("operator")
    with pytest.raises(AccessDenied, match="not active"):
        await authorize_run(
            action="t", mode="service", access_token=token, client_ids=[world.clients["s"]]
        )
    with pytest.raises(AccessDenied, match="unknown client"):
        await authorize_run(
            action="t", mode="service", access_token=token, client_ids=[uuid.uuid4()]
        )


async def test_operator_claim_revoked_in_auth_users_is_refused(world: World) -> None:
    # The token still says operator (issued before the revocation); auth.users does not.
    token = await world.token("revoked_operator", operator=True)
    await set_operator(world.stack.config, world.emails["revoked_operator"], False)
    with pytest.raises(AccessDenied, match="may not start this service flow"):
        await authorize_run(action="t", mode="service", access_token=token, client_ids=None)
    # And a live grant is honoured at once, whatever the token's age.
    token = await world.token("operator")
    await set_operator(world.stack.config, world.emails["operator"], False)
    with pytest.raises(AccessDenied, match="may not start this service flow"):
        await authorize_run(action="t", mode="service", access_token=token, client_ids=None)


async def _visible_events(ctx: TenantContext) -> set[uuid.UUID]:
    async with tenant_session(ctx) as session:
        # NOTE: deliberately unfiltered: only row-level security stands between the
        # user and every other client's rows here.
        rows = await session.execute(text("SELECT client_id FROM public.client_events"))
        return {row[0] for row in rows}


async def test_rls_limits_an_unfiltered_query_to_the_members_client(world: World) -> None:
    ctx = await _user_decision(world, "member_a", "a")
    assert await _visible_events(ctx) == {world.clients["a"]}
    async with tenant_session(ctx) as session:
        count = (await session.execute(text("SELECT count(*) FROM public.client_events"))).scalar()
    assert count == EVENTS_PER_CLIENT


async def test_rls_shows_nothing_to_a_non_member_even_if_the_guard_were_wrong(
    world: World,
) -> None:
    # Simulate a guard bug: a context for a user who is not a member of the client.
    legit = await _user_decision(world, "member_a", "a")
    outsider_claims = legit.actor.claims.model_copy(
        update={
            "sub": world.users["outsider"],
            "claims": {**legit.actor.claims.claims, "sub": str(world.users["outsider"])},
        }
    )
    forged = TenantContext(
        Actor(ActorKind.USER, world.users["outsider"], None, outsider_claims),
        world.clients["a"],
        "a",
        None,
        seal=_SEAL,
    )
    assert await _visible_events(forged) == set()


def test_contexts_cannot_be_made_outside_the_guard() -> None:
    with pytest.raises(AccessDenied, match="issued by the tenant guard"):
        TenantContext(Actor(ActorKind.SCHEDULER), uuid.uuid4(), "x", None)


async def test_service_sessions_see_every_client_but_run_as_service_role(world: World) -> None:
    [ctx] = await authorize_run(
        action="t",
        mode="service",
        access_token=await world.token("operator"),
        client_ids=[world.clients["a"]],
    )
    async with tenant_session(ctx) as session:
        role = (await session.execute(text("SELECT current_user"))).scalar()
    assert role == "service_role"
    assert {world.clients["a"], world.clients["b"]} <= await _visible_events(ctx)


# --------------------------------------------------------------------- scheduler detection


@pytest.fixture
async def scheduled_deployment(stack) -> AsyncIterator[uuid.UUID]:
    async with get_client() as client:
        flow_id = await client.create_flow_from_name(f"guard-test-{uuid.uuid4().hex[:6]}")
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name="scheduled",
            schedules=[
                DeploymentScheduleCreate(
                    schedule=IntervalSchedule(interval=timedelta(hours=1)), active=True
                )
            ],
            paused=False,
        )
    yield deployment_id
    async with get_client() as client:
        await client.delete_deployment(deployment_id)


async def test_a_run_created_by_the_schedule_is_the_scheduler(
    world: World, scheduled_deployment: uuid.UUID
) -> None:
    async with get_client() as client:
        response = await client._client.post(
            f"/deployments/{scheduled_deployment}/schedule", json={"max_runs": 1}
        )
        response.raise_for_status()
        runs = await client.read_flow_runs()
    scheduled = [r for r in runs if r.deployment_id == scheduled_deployment and r.auto_scheduled]
    assert scheduled, "the schedule created no run"
    contexts = await authorize_run(
        action="t",
        mode="service",
        access_token=None,
        client_ids=[world.clients["a"]],
        flow_run_id=scheduled[0].id,
    )
    assert contexts[0].actor.kind is ActorKind.SCHEDULER
    # The scheduler acts for the platform, never for a user.
    with pytest.raises(AccessDenied, match="needs that user's access_token"):
        await authorize_run(
            action="t",
            mode="user",
            access_token=None,
            client_ids=[world.clients["a"]],
            flow_run_id=scheduled[0].id,
        )


async def test_a_manual_run_dressed_as_scheduled_is_not(
    world: World, scheduled_deployment: uuid.UUID
) -> None:
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            scheduled_deployment,
            tags=["auto-scheduled"],
            parameters={},
            idempotency_key=f"scheduled-{uuid.uuid4()}",
        )
        stored = await client.read_flow_run(run.id)
    assert "auto-scheduled" in stored.tags and not stored.auto_scheduled
    with pytest.raises(AccessDenied, match="no access_token"):
        await authorize_run(
            action="t",
            mode="service",
            access_token=None,
            client_ids=[world.clients["a"]],
            flow_run_id=run.id,
        )


async def test_the_token_is_redacted_from_the_stored_parameters(
    world: World, scheduled_deployment: uuid.UUID
) -> None:
    token = await world.token("operator")
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            scheduled_deployment, parameters={"access_token": token, "day": "2026-01-01"}
        )
        assert (await client.read_flow_run(run.id)).parameters["access_token"] == token
    await authorize_run(
        action="t",
        mode="service",
        access_token=token,
        client_ids=[world.clients["a"]],
        flow_run_id=run.id,
    )
    async with get_client() as client:
        stored = (await client.read_flow_run(run.id)).parameters
    assert stored == {"access_token": REDACTED, "day": "2026-01-01"}
    # A retry of that run sees the placeholder and says what to do.
    with pytest.raises(AccessDenied, match="start a new run with a fresh token"):
        await authorize_run(
            action="t",
            mode="service",
            access_token=stored["access_token"],
            client_ids=[world.clients["a"]],
            flow_run_id=run.id,
        )


async def test_a_refused_token_is_redacted_too(
    world: World, scheduled_deployment: uuid.UUID
) -> None:
    token = await world.token("member_a")
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            scheduled_deployment, parameters={"access_token": token}
        )
    with pytest.raises(AccessDenied):
        await authorize_run(
            action="t", mode="service", access_token=token, client_ids=None, flow_run_id=run.id
        )
    async with get_client() as client:
        assert (await client.read_flow_run(run.id)).parameters["access_token"] == REDACTED


async def test_the_failure_hook_redacts_a_run_that_failed_before_its_first_step(
    world: World, scheduled_deployment: uuid.UUID
) -> None:
    from flows.client_report import client_report
    from flows.nightly_rollup import nightly_rollup
    from tenantflow.tenancy import redact_token_on_failure

    token = await world.token("member_a")
    async with get_client() as client:
        run = await client.create_flow_run_from_deployment(
            scheduled_deployment, parameters={"access_token": token, "period_end": "bad"}
        )
        await redact_token_on_failure(None, await client.read_flow_run(run.id), run.state)
        stored = (await client.read_flow_run(run.id)).parameters
    assert stored == {"access_token": REDACTED, "period_end": "bad"}
    for flow_ in (client_report, nightly_rollup):
        assert redact_token_on_failure in flow_.on_failure_hooks
        assert redact_token_on_failure in flow_.on_crashed_hooks


async def test_a_signed_out_operator_session_is_refused(world: World) -> None:
    import httpx

    token = await world.token("operator")
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{world.stack.config.supabase_url}/auth/v1/logout",
            headers={
                "apikey": world.stack.config.secrets.anon_key,
                "Authorization": f"Bearer {token}",
            },
        )
    assert response.status_code == 204, response.text
    with pytest.raises(AccessDenied, match="operator token refused"):
        await authorize_run(action="t", mode="service", access_token=token, client_ids=None)
