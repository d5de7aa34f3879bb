"""The tenant guard's decision table, its audit trail, and RLS as the second line.

These take plain tokens (`authorize_token`); how a sealed token reaches the same table
inside a flow run is in test_sealed.py, the scheduler in test_scheduler.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr
from sqlalchemy import text

from tenantflow.db import LaneConnection, connection_lane, dispose_engines, unit_of_work
from tenantflow.tenancy import (
    AccessDenied,
    Actor,
    ActorKind,
    TenantContext,
    authorize_token,
    tenant_session,
)
from tenantflow_dev.auth_stand_in import set_operator
from tests.world import EVENTS_PER_CLIENT, World

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
    contexts = await authorize_token(
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
        await authorize_token(
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
        await authorize_token(
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
        await authorize_token(
            action="t", mode="user", access_token=forged, client_ids=[world.clients["a"]]
        )
    for text_ in (str(caught.value), repr(caught.value)):
        assert forged not in text_ and signature not in text_ and payload not in text_


async def test_no_token_outside_a_scheduled_run_is_denied(world: World) -> None:
    with pytest.raises(AccessDenied, match="no access_token"):
        await authorize_token(action="t", mode="service", access_token=None, client_ids=None)


async def test_service_mode_refuses_plain_users(world: World) -> None:
    with pytest.raises(AccessDenied, match="may not start this service flow"):
        await authorize_token(
            action="t",
            mode="service",
            access_token=await world.token("member_a"),
            client_ids=None,
        )


async def test_operator_runs_service_flows_for_the_clients_asked(world: World) -> None:
    contexts = await authorize_token(
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
    contexts = await authorize_token(
        action="t", mode="service", access_token=await world.token("operator"), client_ids=None
    )
    ids = {c.client_id for c in contexts}
    assert {world.clients["a"], world.clients["b"]} <= ids
    assert world.clients["s"] not in ids


async def test_service_mode_refuses_inactive_or_unknown_clients(world: World) -> None:
    token = await world.token("operator")
    with pytest.raises(AccessDenied, match="not active"):
        await authorize_token(
            action="t", mode="service", access_token=token, client_ids=[world.clients["s"]]
        )
    with pytest.raises(AccessDenied, match="unknown client"):
        await authorize_token(
            action="t", mode="service", access_token=token, client_ids=[uuid.uuid4()]
        )


async def test_operator_claim_revoked_in_auth_users_is_refused(world: World) -> None:
    # The token still says operator (issued before the revocation); auth.users does not.
    token = await world.token("revoked_operator", operator=True)
    await set_operator(world.stack.config, world.emails["revoked_operator"], False)
    with pytest.raises(AccessDenied, match="may not start this service flow"):
        await authorize_token(action="t", mode="service", access_token=token, client_ids=None)
    # And a live grant is honoured at once, whatever the token's age.
    token = await world.token("operator")
    await set_operator(world.stack.config, world.emails["operator"], False)
    with pytest.raises(AccessDenied, match="may not start this service flow"):
        await authorize_token(action="t", mode="service", access_token=token, client_ids=None)


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
        seal=legit.seal,
    )
    assert await _visible_events(forged) == set()


def test_contexts_cannot_be_made_outside_the_guard() -> None:
    with pytest.raises(AccessDenied, match="issued by the tenant guard"):
        TenantContext(Actor(ActorKind.SCHEDULER), uuid.uuid4(), "x", None)


async def test_service_sessions_see_every_client_but_run_as_service_role(world: World) -> None:
    [ctx] = await authorize_token(
        action="t",
        mode="service",
        access_token=await world.token("operator"),
        client_ids=[world.clients["a"]],
    )
    async with tenant_session(ctx) as session:
        role = (await session.execute(text("SELECT current_user"))).scalar()
    assert role == "service_role"
    assert {world.clients["a"], world.clients["b"]} <= await _visible_events(ctx)


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
        await authorize_token(action="t", mode="service", access_token=token, client_ids=None)


async def test_a_refusal_does_not_tell_whether_another_client_exists(world: World) -> None:
    token = await world.token("member_a")
    messages = []
    for client in (world.clients["b"], uuid.uuid4()):
        with pytest.raises(AccessDenied) as caught:
            await authorize_token(action="t", mode="user", access_token=token, client_ids=[client])
        messages.append(str(caught.value).replace(str(client), "<client>"))
    assert messages[0] == messages[1]


async def test_user_sessions_set_the_claims_auth_uid_reads_first(world: World) -> None:
    ctx = await _user_decision(world, "member_a", "a")
    async with tenant_session(ctx) as session:
        row = (
            await session.execute(
                text(
                    "SELECT current_setting('request.jwt.claim.sub', true), auth.uid(), "
                    "current_user"
                )
            )
        ).one()
    assert row == (str(world.users["member_a"]), world.users["member_a"], "authenticated")


async def test_a_failing_tenant_query_keeps_its_bound_values_out_of_the_error(
    world: World,
) -> None:
    ctx = await _user_decision(world, "member_a", "a")
    email = ctx.actor.claims.email
    assert email
    with pytest.raises(Exception) as caught:
        async with tenant_session(ctx) as session:
            await session.execute(
                text("SELECT CAST(:value AS text) || CAST(1 / 0 AS text)"), {"value": email}
            )
    assert "division by zero" in str(caught.value)
    assert email not in str(caught.value) and email not in repr(caught.value)


async def test_on_a_lane_each_unit_runs_with_its_own_claims_role_and_rls(world: World) -> None:
    """The sweep's fast path: units one after another on one lane connection, users of two
    clients in turn, each sees its own client only; nothing of one unit reaches the next."""
    member_a = await _user_decision(world, "member_a", "a")
    member_b = await _user_decision(world, "member_b", "b")
    seen = []
    async with connection_lane():
        for ctx in [member_a, member_b] * 3:
            async with tenant_session(ctx) as session:
                assert isinstance(session, LaneConnection)
                who = (
                    await session.execute(
                        text("SELECT current_user, auth.uid(), current_setting('role')")
                    )
                ).one()
                events = await session.execute(text("SELECT client_id FROM public.client_events"))
                seen.append((tuple(who), {row.client_id for row in events}))
        async with unit_of_work() as session:
            assert isinstance(session, LaneConnection)
            leftover = (
                await session.execute(
                    text(
                        "SELECT current_user, current_setting('request.jwt.claims', true), "
                        "current_setting('request.jwt.claim.sub', true)"
                    )
                )
            ).one()
    a, b = world.clients["a"], world.clients["b"]
    alice = ("authenticated", world.users["member_a"], "authenticated")
    bob = ("authenticated", world.users["member_b"], "authenticated")
    assert seen == [(alice, {a}), (bob, {b})] * 3
    # The login's own role, and no claims: every setting of the units was transaction-local.
    assert leftover[0] == "tenantflow_worker"
    assert not leftover[1] and not leftover[2]
