"""prefect.yaml, the bootstrap of a Prefect installation, and `tenantflow deploy`."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint

from tenantflow.deployments import (
    MIGRATE_POOL,
    WORK_POOLS,
    BootstrapError,
    PoolType,
    abootstrap,
    base_job_template,
    set_project_directory,
)
from tenantflow.project import deployment_names
from tenantflow.worker import base_job_template as tenantflow_template
from tenantflow_dev import Stack
from tenantflow_dev.prefect_setup import bootstrap, deploy, stack_settings

PROJECT = Path(__file__).resolve().parents[2]
SEALED_PATTERN = json.dumps(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){4}$")
EXPECTED = {
    "nightly-rollup": (
        "flows/nightly_rollup.py:nightly_rollup",
        {"day", "client_ids", "access_token"},
    ),
    "nightly-rollup-shard": ("flows/nightly_rollup_shard.py:nightly_rollup_shard", set()),
    "client-report": (
        "flows/client_report.py:client_report",
        {"client_id", "period_start", "period_end", "access_token"},
    ),
    "migrate": ("flows/migrate.py:migrate", {"access_token", "revision", "dry_run"}),
    # The worker's floor for `make bench`: no parameters, no client data.
    "noop": ("flows/noop.py:noop", set()),
}
PULL: list[dict[str, Any]] = [{"tenantflow.deployments.set_project_directory": {}}]
POOLS = {name: MIGRATE_POOL if name == "migrate" else WORK_POOLS["process"] for name in EXPECTED}


def _prefect_yaml() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    return document


# --------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_declares_every_deployment() -> None:
    document = _prefect_yaml()
    # Prefect 3.9's own model of the file accepts it.
    model = PrefectYamlModel.model_validate(document)
    assert [d.name for d in model.deployments] == list(EXPECTED)
    assert deployment_names(PROJECT) == list(EXPECTED)
    assert document["pull"] == PULL
    assert document["definitions"]["work_pools"]["local"]["name"] == WORK_POOLS["process"]
    assert document["definitions"]["work_pools"]["migrate"]["name"] == MIGRATE_POOL

    deployments = {d["name"]: d for d in document["deployments"]}
    for name, (entrypoint, parameters) in EXPECTED.items():
        deployment = deployments[name]
        assert deployment["entrypoint"] == entrypoint
        # `migrate` alone on a pool of its own: its worker alone holds the owner's login.
        assert deployment["work_pool"]["name"] == POOLS[name]
        assert deployment["description"].strip()
        assert "tenantflow" in deployment["tags"]
        assert deployment["enforce_parameter_schema"] is True
        # The flow's signature is the form: declared defaults must be real parameters.
        flow: Any = load_flow_from_entrypoint(str(PROJECT / entrypoint))
        assert set(inspect.signature(flow.fn).parameters) == parameters
        assert set(deployment["parameters"]) <= parameters

    (schedule,) = deployments["nightly-rollup"]["schedules"]
    assert schedule == {
        "cron": "15 2 * * *",
        "timezone": "UTC",
        "slug": "nightly-rollup-0215-utc",
        "active": True,
    }
    one_at_a_time = {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert deployments["nightly-rollup"]["concurrency_limit"] == one_at_a_time
    assert deployments["migrate"]["concurrency_limit"] == one_at_a_time
    assert "concurrency_limit" not in deployments["client-report"]
    assert "schedules" not in deployments["client-report"]
    assert deployments["noop"]["parameters"] == {}
    assert "schedules" not in deployments["noop"]


def test_pull_step_reads_the_folder_at_run_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "flows").mkdir()
    monkeypatch.chdir(PROJECT)
    monkeypatch.setenv("TENANTFLOW_PROJECT_DIR", str(tmp_path))
    assert set_project_directory() == {"directory": str(tmp_path.resolve())}
    assert Path.cwd() == tmp_path.resolve()

    monkeypatch.delenv("TENANTFLOW_PROJECT_DIR")
    with pytest.raises(RuntimeError, match="TENANTFLOW_PROJECT_DIR is not set"):
        set_project_directory()
    monkeypatch.setenv("TENANTFLOW_PROJECT_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no flows/ folder"):
        set_project_directory()


def test_base_job_templates_are_complete() -> None:
    """Every placeholder names a variable with a default; no secret sits in a template."""
    from prefect.utilities.templating import find_placeholders

    assert base_job_template("process", PROJECT) == tenantflow_template()
    kinds: tuple[PoolType, ...] = ("docker", "kubernetes")
    for kind in kinds:
        template = base_job_template(kind, PROJECT)
        variables = template["variables"]["properties"]
        used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
        assert used <= set(variables), used - set(variables)
        assert set(variables) - used == set(), "variables the job never uses"
        text = json.dumps(template)
        for secret in ("postgresql://", "DATABASE_URL=", "password"):
            assert secret not in text
    kubernetes = base_job_template("kubernetes", PROJECT, image="registry.example/tf:1.4.0")
    manifest = kubernetes["job_configuration"]["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "tenantflow-worker"}}]
    assert container["image"] == "registry.example/tf:1.4.0"
    docker = base_job_template("docker", PROJECT, image="registry.example/tf:1.4.0")
    assert docker["job_configuration"]["privileged"] is False
    assert docker["job_configuration"]["image"] == "registry.example/tf:1.4.0"
    # Without --image: the templates' own tenantflow-worker image.
    assert base_job_template("docker", PROJECT)["job_configuration"]["image"].startswith(
        "tenantflow-worker"
    )
    with pytest.raises(BootstrapError, match="takes no image"):
        base_job_template("process", PROJECT, image="x")


def test_bootstrap_refuses_a_budget_no_flow_can_use() -> None:
    with pytest.raises(BootstrapError, match="DB_FLOW_SLOTS=6 exceeds"):
        asyncio.run(
            abootstrap(
                concurrency_limit="x",
                concurrency_slots=5,
                flow_slots=6,
                project_dir=PROJECT,
                api_url="http://127.0.0.1:9/api",
            )
        )


# --------------------------------------------------------------------------- bootstrap


@pytest.mark.stack
async def test_bootstrap_is_idempotent(stack: Stack) -> None:
    settings = stack_settings(stack.config)
    await asyncio.to_thread(bootstrap, stack.config)
    again = await asyncio.to_thread(bootstrap, stack.config)
    assert again.work_pools == {"tenantflow-process": "unchanged", MIGRATE_POOL: "unchanged"}
    assert again.concurrency_limits == {settings.db_concurrency_limit: "unchanged"}

    async with get_client() as client:
        pools = await client.read_work_pools(
            work_pool_filter=WorkPoolFilter(
                name=WorkPoolFilterName(any_=["tenantflow-process", MIGRATE_POOL])
            )
        )
        assert sorted((p.name, p.type) for p in pools) == [
            (MIGRATE_POOL, "process"),
            ("tenantflow-process", "process"),
        ]
        # Both lock what runs alike.
        assert pools[0].base_job_template == pools[1].base_job_template == tenantflow_template()
        limits = [
            limit
            for limit in await client.read_global_concurrency_limits(limit=200)
            if limit.name == settings.db_concurrency_limit
        ]
        assert len(limits) == 1
        assert limits[0].limit == settings.db_concurrency_slots <= stack.config.pooler_pool_size
        assert limits[0].active
        assert not limits[0].slot_decay_per_second

        # Drift is repaired in place (here: the pool's description).
        from prefect.client.schemas.actions import WorkPoolUpdate

        await client.update_work_pool("tenantflow-process", WorkPoolUpdate(description="x"))
    repaired = await asyncio.to_thread(bootstrap, stack.config)
    assert repaired.work_pools == {"tenantflow-process": "updated", MIGRATE_POOL: "unchanged"}
    unchanged = await asyncio.to_thread(bootstrap, stack.config)
    assert unchanged.work_pools == {"tenantflow-process": "unchanged", MIGRATE_POOL: "unchanged"}


@pytest.mark.stack
async def test_concurrent_bootstraps_make_one_limit_and_resize_it(stack: Stack) -> None:
    name = f"tenantflow-test-{uuid.uuid4().hex[:8]}"

    async def run(slots: int) -> Any:
        return await abootstrap(
            concurrency_limit=name,
            concurrency_slots=slots,
            flow_slots=1,
            project_dir=PROJECT,
            api_url=stack.config.prefect_api_url,
        )

    try:
        results = await asyncio.gather(run(4), run(4), run(4))
        outcomes = sorted(r.concurrency_limits[name] for r in results)
        assert outcomes.count("created") >= 1
        resized = await run(6)
        assert resized.concurrency_limits[name] == "updated"
        assert (await run(6)).concurrency_limits[name] == "unchanged"
        async with get_client() as client:
            found = [
                limit
                for limit in await client.read_global_concurrency_limits(limit=200)
                if limit.name == name
            ]
            assert [limit.limit for limit in found] == [6]
    finally:
        async with get_client() as client:
            await client.delete_global_concurrency_limit_by_name(name)


# --------------------------------------------------------------------------- deploy


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantflow.cli", *args],
        cwd=stack.config.project_dir,
        env={
            **os.environ,
            **stack.config.environment(),
            "TENANTFLOW_PROJECT_DIR": str(stack.config.project_dir),
        },
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.stack
@pytest.mark.slow
async def _deployment_ids() -> dict[str, uuid.UUID | None]:
    async with get_client() as client:
        ids: dict[str, uuid.UUID | None] = {}
        for name in EXPECTED:
            try:
                ids[name] = (await client.read_deployment_by_name(f"{name}/{name}")).id
            except ObjectNotFound:
                ids[name] = None
        return ids


async def test_deploy_creates_every_deployment_once(stack: Stack) -> None:
    # Deploying again changes nothing: no duplicate schedule, same ids. The stack's set-up
    # deployed the project already (`deploy`, as `make up` does); the CLI deploys it again.
    before = await _deployment_ids()
    if None in before.values():
        await asyncio.to_thread(deploy, stack.config)
        before = await _deployment_ids()
    started = time.monotonic()
    again = await asyncio.to_thread(_cli, stack, "deploy")
    cli_seconds = time.monotonic() - started
    assert again.returncode == 0, again.stdout + again.stderr
    deployed = "deployed nightly-rollup, nightly-rollup-shard, client-report, migrate, noop onto"
    assert deployed in again.stdout
    assert stack.config.secrets.postgres_password not in again.stdout + again.stderr
    sys.stderr.write(f"\ntenantflow deploy (again): {cli_seconds:.1f}s\n")
    assert await _deployment_ids() == before

    async with get_client() as client:
        for name, (entrypoint, parameters) in EXPECTED.items():
            deployment = await client.read_deployment_by_name(f"{name}/{name}")
            assert deployment.entrypoint == entrypoint
            assert deployment.work_pool_name == POOLS[name]
            assert deployment.pull_steps == PULL
            assert deployment.enforce_parameter_schema
            schema = deployment.parameter_openapi_schema or {}
            assert set(schema["properties"]) == parameters
            if "access_token" in parameters:
                # The server refuses a plain JWT (three segments) when a run is created.
                token = json.dumps(schema["properties"]["access_token"])
                assert SEALED_PATTERN in token
        rollup = await client.read_deployment_by_name("nightly-rollup/nightly-rollup")
        (schedule,) = rollup.schedules
        assert schedule.slug == "nightly-rollup-0215-utc"
        assert schedule.active
        assert schedule.schedule.cron == "15 2 * * *"
        assert schedule.schedule.timezone == "UTC"
        for name in ("nightly-rollup", "migrate"):
            deployment = await client.read_deployment_by_name(f"{name}/{name}")
            assert deployment.global_concurrency_limit is not None
            assert deployment.global_concurrency_limit.limit == 1
            assert deployment.concurrency_options is not None
            assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
        report = await client.read_deployment_by_name("client-report/client-report")
        assert report.global_concurrency_limit is None
        assert report.schedules == []
        migrate = await client.read_deployment_by_name("migrate/migrate")
        assert migrate.parameters == {"revision": "head", "dry_run": False}
