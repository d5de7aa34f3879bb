"""Sealed tokens inside flow runs: opened once, bound to flow and clients, never kept plain.

The sealing format's own hostile matrix (keys, tampering, time) is in
tests/unit/test_sealing.py; these run the guard against the stack's Prefect API and
database, where the single use is recorded.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.states import Completed, Running, Scheduled

from tenantflow.db import dispose_engines
from tenantflow.sealing import generate_private_key, public_key, seal_access_token
from tenantflow.settings import get_settings
from tenantflow.tenancy import REDACTED, AccessDenied, ActorKind, authorize_run
from tenantflow.tenancy.guard import RunArguments
from tests.world import World

pytestmark = pytest.mark.stack

Runs = Callable[..., Awaitable[FlowRun]]


@pytest.fixture(autouse=True)
async def _dispose() -> AsyncIterator[None]:
    yield
    await dispose_engines()


async def _report(
    world: World,
    sealed: str,
    run: FlowRun,
    client: str = "a",
    arguments: RunArguments | None = None,
) -> list:
    """The guard of a `client-report` run on `client`, its flow having received
    `arguments` (by default the run's parameters as created)."""
    return await authorize_run(
        action="client-report",
        mode="user",
        access_token=sealed,
        client_ids=[world.clients[client]],
        flow_run_id=run.id,
        arguments=arguments or _received(run),
    )


def _received(run: FlowRun) -> RunArguments:
    """What the flow of a parked run would receive: its parameters as created."""
    return RunArguments(dict(run.parameters))


async def _decisions(world: World, run: FlowRun) -> list[tuple[str, str]]:
    rows = await world.sql(
        "fetch",
        "SELECT outcome, reason FROM public.audit_log WHERE flow_run_id = $1 ORDER BY id",
        run.id,
    )
    return [(r["outcome"], r["reason"]) for r in rows]


async def test_a_sealed_member_token_acts_for_its_user(world: World, parked_runs: Runs) -> None:
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"])
    run = await parked_runs(access_token=sealed)
    [ctx] = await _report(world, sealed, run)
    assert ctx.actor.kind is ActorKind.USER and ctx.actor.user_id == world.users["member_a"]
    assert await _decisions(world, run) == [("allowed", "user in user mode")]
    # Prefect holds only the sealed value: the token is nowhere in it.
    token_signature = (await world.token("member_a")).split(".")[2]
    async with get_client() as client:
        stored = (await client.read_flow_run(run.id)).parameters["access_token"]
    assert stored == sealed and token_signature not in stored


async def test_a_seal_is_good_for_one_run_only(world: World, parked_runs: Runs) -> None:
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"])
    first, replay = await parked_runs(access_token=sealed), await parked_runs(access_token=sealed)
    await _report(world, sealed, first)
    with pytest.raises(AccessDenied, match=f"already used by flow run {first.id}"):
        await _report(world, sealed, replay)
    [(outcome, reason)] = await _decisions(world, replay)
    assert outcome == "denied" and "already used" in reason
    # The run that holds it may open it again (Prefect retrying the same run).
    [ctx] = await _report(world, sealed, first)
    assert ctx.actor.user_id == world.users["member_a"]
    uses = await world.sql(
        "fetch",
        "SELECT flow_run_id FROM tenantflow_private.sealed_token_uses "
        "WHERE flow_run_id = ANY($1::uuid[])",
        [first.id, replay.id],
    )
    assert [r["flow_run_id"] for r in uses] == [first.id]


async def test_a_seal_for_another_client_or_flow_is_refused_and_not_used_up(
    world: World, parked_runs: Runs
) -> None:
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"])
    wrong_client = await parked_runs(access_token=sealed)
    with pytest.raises(AccessDenied, match="sealed access token refused"):
        await _report(world, sealed, wrong_client, client="b")
    wrong_flow = await parked_runs(access_token=sealed)
    with pytest.raises(AccessDenied, match="sealed access token refused"):
        await authorize_run(
            action="nightly-rollup",
            mode="service",
            access_token=sealed,
            client_ids=[world.clients["a"]],
            flow_run_id=wrong_flow.id,
            arguments=_received(wrong_flow),
        )
    for run in (wrong_client, wrong_flow):
        assert [outcome for outcome, _ in await _decisions(world, run)] == ["denied"]
    # Neither refusal spent the seal: the run it was made for still works.
    [ctx] = await _report(world, sealed, await parked_runs(access_token=sealed))
    assert ctx.client_id == world.clients["a"]


async def test_a_seal_to_another_key_or_an_expired_one_is_refused(
    world: World, parked_runs: Runs
) -> None:
    token = await world.token("member_a")
    other_key = public_key(generate_private_key())
    foreign = seal_access_token(
        token, other_key, flow="client-report", client_ids=[world.clients["a"]]
    )
    with pytest.raises(AccessDenied, match="cannot be opened") as caught:
        await _report(world, foreign, await parked_runs(access_token=foreign))
    assert token not in str(caught.value) and foreign not in str(caught.value)
    expired = await world.sealed(
        "member_a", flow="client-report", clients=["a"], ttl_s=600, now=time.time() - 3600
    )
    with pytest.raises(AccessDenied, match="expired"):
        await _report(world, expired, await parked_runs(access_token=expired))


async def test_a_plain_token_is_refused_and_removed_from_prefect(
    world: World, parked_runs: Runs
) -> None:
    token = await world.token("member_a")
    run = await parked_runs(access_token=token, period_end="2026-01-01")
    with pytest.raises(AccessDenied, match="plain access token") as caught:
        await _report(world, token, run)
    assert "tenantflow seal" in str(caught.value) and token not in str(caught.value)
    async with get_client() as client:
        stored = (await client.read_flow_run(run.id)).parameters
    assert stored == {"access_token": REDACTED, "period_end": "2026-01-01"}
    # A retry of that run sees the placeholder and says what to do.
    with pytest.raises(AccessDenied, match="start a new run with a sealed access token"):
        await _report(world, REDACTED, run)


async def test_the_failure_hook_removes_a_plain_token(world: World, parked_runs: Runs) -> None:
    from flows.client_report import client_report
    from flows.migrate import migrate
    from flows.nightly_rollup import nightly_rollup
    from tenantflow.tenancy import redact_token_on_failure

    token = await world.token("member_a")
    run = await parked_runs(access_token=token, period_end="bad")
    await redact_token_on_failure(None, run, run.state)
    async with get_client() as client:
        assert (await client.read_flow_run(run.id)).parameters == {
            "access_token": REDACTED,
            "period_end": "bad",
        }
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"])
    kept = await parked_runs(access_token=sealed)
    await redact_token_on_failure(None, kept, kept.state)
    async with get_client() as client:
        assert (await client.read_flow_run(kept.id)).parameters == {"access_token": sealed}
    for flow_ in (client_report, nightly_rollup, migrate):
        assert redact_token_on_failure in flow_.on_failure_hooks
        assert redact_token_on_failure in flow_.on_crashed_hooks
        assert redact_token_on_failure in flow_.on_cancellation_hooks


async def test_a_worker_without_seal_keys_says_so(world: World, parked_runs: Runs) -> None:
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"])
    settings = get_settings().model_copy(update={"seal_private_keys": None})
    run = await parked_runs(access_token=sealed)
    with pytest.raises(AccessDenied, match="SEAL_PRIVATE_KEYS is not set"):
        await authorize_run(
            action="client-report",
            mode="user",
            access_token=sealed,
            client_ids=[world.clients["a"]],
            flow_run_id=run.id,
            arguments=_received(run),
            settings=settings,
        )


async def test_a_seal_is_only_opened_inside_a_flow_run(world: World) -> None:
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"])
    with pytest.raises(AccessDenied, match="only opened inside a flow run"):
        await authorize_run(
            action="client-report",
            mode="user",
            access_token=sealed,
            client_ids=[world.clients["a"]],
        )


async def test_migrate_admits_operators_only(world: World, parked_runs: Runs) -> None:
    for who, operator in (("member_a", False), ("operator", True)):
        sealed = await world.sealed(who, flow="migrate", clients=None, operator=operator)
        run = await parked_runs(access_token=sealed)
        if not operator:
            with pytest.raises(AccessDenied, match="only a tenantflow operator"):
                await authorize_run(
                    action="migrate",
                    mode="operator",
                    access_token=sealed,
                    client_ids=None,
                    flow_run_id=run.id,
                    arguments=_received(run),
                )
            assert [o for o, _ in await _decisions(world, run)] == ["denied"]
            continue
        assert (
            await authorize_run(
                action="migrate",
                mode="operator",
                access_token=sealed,
                client_ids=None,
                flow_run_id=run.id,
                arguments=_received(run),
            )
            == []
        )
        assert await _decisions(world, run) == [("allowed", "operator in operator mode")]
    # And without any token, migrate is not the scheduler's either.
    with pytest.raises(AccessDenied, match="no access_token"):
        await authorize_run(
            action="migrate",
            mode="operator",
            access_token=None,
            client_ids=None,
            flow_run_id=(bare := await parked_runs()).id,
            arguments=_received(bare),
        )


PERIOD = {"period_start": "2026-11-01", "period_end": "2026-11-30"}


async def test_a_seal_opens_only_in_a_run_with_the_parameters_it_was_sealed_for(
    world: World, parked_runs: Runs
) -> None:
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"], parameters=PERIOD)
    # Copied into a run of the same flow and client with a period of the copier's choosing.
    copied = await parked_runs(access_token=sealed, **{**PERIOD, "period_end": "2026-12-31"})
    with pytest.raises(AccessDenied, match="sealed for a run with other parameters") as caught:
        await _report(world, sealed, copied)
    assert "2026-12-31" not in str(caught.value)
    assert [outcome for outcome, _ in await _decisions(world, copied)] == ["denied"]
    # Refused before it was used: the run it was sealed for still opens it.
    intended = await parked_runs(access_token=sealed, **PERIOD)
    [ctx] = await _report(world, sealed, intended)
    assert ctx.actor.user_id == world.users["member_a"]


async def test_the_seal_is_checked_against_what_the_flow_received_not_the_api(
    world: World, parked_runs: Runs
) -> None:
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"], parameters=PERIOD)
    # The stored parameters were patched back to the sealed ones once the run started; the
    # flow itself was started with another period.
    run = await parked_runs(access_token=sealed, **PERIOD)
    received = RunArguments({**PERIOD, "period_start": "2020-01-01", "access_token": sealed})
    with pytest.raises(AccessDenied, match="other parameters"):
        await _report(world, sealed, run, arguments=received)


async def test_a_run_put_back_after_it_ended_does_not_open_its_seal_again(
    world: World, parked_runs: Runs
) -> None:
    sealed = await world.sealed("member_a", flow="client-report", clients=["a"], parameters=PERIOD)
    run = await parked_runs(access_token=sealed, **PERIOD)
    [ctx] = await _report(world, sealed, run)
    assert ctx.client_id == world.clients["a"]
    async with get_client() as client:
        states: list[State[Any]] = [Running(), Completed(), Scheduled()]
        for state in states:
            await client.set_flow_run_state(run.id, state, force=True)
    with pytest.raises(AccessDenied, match="already ended once") as caught:
        await _report(world, sealed, run)
    assert "freshly sealed access token" in str(caught.value)
    assert [outcome for outcome, _ in await _decisions(world, run)] == ["allowed", "denied"]


async def test_a_run_whose_seal_was_removed_says_to_start_a_new_one(
    world: World, parked_runs: Runs
) -> None:
    from tenantflow.tenancy.run_token import SPENT

    run = await parked_runs(access_token=SPENT)
    with pytest.raises(AccessDenied, match=r"removed when the run ended.*start a new run"):
        await _report(world, SPENT, run)
    assert [outcome for outcome, _ in await _decisions(world, run)] == ["denied"]
