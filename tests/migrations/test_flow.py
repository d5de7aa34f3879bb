"""The `migrate` flow and `tenantflow migrate`, run against the stack's Prefect server."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.migrate import migrate
from tenantflow import cli
from tenantflow.migrate import (
    MIGRATION_LOCK_KEY,
    MigrationResult,
    run_migration,
    script_directory,
)
from tenantflow.settings import get_settings
from tests.migrations.conftest import NewDatabase
from tests.migrations.support import ScratchDatabase, fingerprint
from tests.world import World, world

__all__ = ["world"]

pytestmark = pytest.mark.stack

HEAD = script_directory().get_current_head()


async def _artifacts(flow_run_id: uuid.UUID) -> dict[str | None, str]:
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {artifact.key: str(artifact.data) for artifact in artifacts}


async def _operator(world: World, **parameters: object) -> str:
    """An operator's token sealed for one `migrate` run with `parameters`."""
    return await world.sealed(
        "operator", flow="migrate", clients=None, operator=True, parameters=parameters
    )


async def test_flow_dry_run_reports_the_sql_and_changes_nothing(
    scratch_schema_env: ScratchDatabase, world: World
) -> None:
    scratch_env = scratch_schema_env
    conn = await scratch_env.connect()
    try:
        before = await fingerprint(conn)
        sealed = await _operator(world, dry_run=True)
        state = await migrate(access_token=sealed, dry_run=True, return_state=True)
        assert state.is_completed(), state.message
        result: MigrationResult = await state.aresult()
        assert result.dry_run and result.target == HEAD
        assert await fingerprint(conn) == before
    finally:
        await conn.close()
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    artifacts = await _artifacts(flow_run_id)
    assert "```sql" in artifacts["migration-dry-run"]
    assert "CREATE TABLE clients" in artifacts["migration-dry-run"]


async def test_flow_upgrade_reports_before_and_after(
    scratch_schema_env: ScratchDatabase, world: World
) -> None:
    state = await migrate(access_token=await _operator(world), return_state=True)
    assert state.is_completed(), state.message
    assert state.state_details.flow_run_id is not None
    report = (await _artifacts(state.state_details.flow_run_id))["migration"]
    assert "| before | `base` |" in report and f"| after | `{HEAD}` |" in report


async def test_two_flow_runs_at_the_same_moment(
    scratch_schema_env: ScratchDatabase, new_database: NewDatabase, world: World
) -> None:
    scratch_env = scratch_schema_env
    states = await asyncio.gather(
        migrate(access_token=await _operator(world), return_state=True),
        migrate(access_token=await _operator(world), return_state=True),
    )
    assert all(state.is_completed() for state in states), [s.message for s in states]
    results: list[MigrationResult] = [await state.aresult() for state in states]
    assert sorted(bool(result.steps) for result in results) == [False, True]
    assert {result.after for result in results} == {HEAD}

    reference = await new_database()
    await run_migration(settings=reference.settings())
    conn, reference_conn = await scratch_env.connect(), await reference.connect()
    try:
        assert await fingerprint(conn) == await fingerprint(reference_conn)
    finally:
        await conn.close()
        await reference_conn.close()


async def test_flow_fails_clearly_without_retrying(
    scratch_schema_env: ScratchDatabase, monkeypatch: pytest.MonkeyPatch, world: World
) -> None:
    scratch_env = scratch_schema_env
    monkeypatch.setenv("MIGRATION_LOCK_TIMEOUT_S", "0")
    get_settings.cache_clear()
    holder = await scratch_env.connect(port=scratch_env.config.session_pooler_port)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        state = await migrate(access_token=await _operator(world), return_state=True)
    finally:
        await holder.close()
    assert state.is_failed()
    assert "another migration is running" in str(await state.aresult(raise_on_failure=False))
    assert state.state_details.flow_run_id is not None
    async with get_client() as client:
        run = await client.read_flow_run(state.state_details.flow_run_id)
    assert run.run_count == 1


async def test_only_operators_migrate_and_nothing_is_touched_otherwise(
    scratch_schema_env: ScratchDatabase, world: World
) -> None:
    conn = await scratch_schema_env.connect()
    try:
        before = await fingerprint(conn)
        member = await world.sealed("member_a", flow="migrate", clients=None)
        refused = await migrate(access_token=member, return_state=True)
        assert refused.is_failed()
        assert "only a tenantflow operator" in str(await refused.aresult(raise_on_failure=False))
        assert await fingerprint(conn) == before
    finally:
        await conn.close()
    denied = await world.sql(
        "fetchval",
        "SELECT outcome FROM public.audit_log WHERE flow_run_id = $1 AND action = 'migrate'",
        refused.state_details.flow_run_id,
    )
    assert denied == "denied"


def test_the_flow_cannot_downgrade() -> None:
    assert "downgrade_to" not in migrate.parameters.properties
    assert set(migrate.parameters.properties) == {"access_token", "revision", "dry_run"}


def test_cli_dry_run_prints_the_sql(
    scratch_schema_env: ScratchDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tenantflow")
    assert cli.main(["migrate", "--dry-run"]) == 0
    assert "CREATE TABLE clients" in caplog.text
    assert "dry run: would upgrade base" in caplog.text


async def test_cli_downgrades_only_when_confirmed(
    scratch_schema_env: ScratchDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    await run_migration(settings=scratch_schema_env.settings())
    conn = await scratch_schema_env.connect()
    try:
        at_head = await fingerprint(conn)
        code = await asyncio.to_thread(cli.main, ["migrate", "--downgrade-to", "base"])
        assert code == 2 and "--yes" in capsys.readouterr().err
        assert await fingerprint(conn) == at_head
        code = await asyncio.to_thread(cli.main, ["migrate", "--downgrade-to", "base", "--yes"])
        assert code == 0
        assert await conn.fetchval("SELECT to_regclass('public.clients')") is None
    finally:
        await conn.close()
        # NOTE: roles are cluster-wide: the downgrade took `authenticated` and
        # `service_role` from the workers' role for every database of the cluster, the
        # stack's own too. Upgrading the scratch database again gives them back.
        await run_migration(settings=scratch_schema_env.settings())
    conn = await scratch_schema_env.connect()
    try:
        member_of = "SELECT pg_has_role('tenantflow_worker', $1, 'MEMBER')"
        assert await conn.fetchval(member_of, "service_role")
        assert await conn.fetchval(member_of, "authenticated")
    finally:
        await conn.close()
