"""Every `tenantflow` (and `tenantflow-dev`) command fails in one line on stderr, with what
to do; --debug adds the traceback. No stack here: the environment points at closed ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tenantflow import cli
from tests.processes import free_ports

HINT = "`make up` or `tenantflow-dev status`"


def _base_env(tmp_path: Path) -> dict[str, str]:
    """No setting of the suite's stack: only what a shell has, and a folder without .env."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    return {
        **env,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "TENANTFLOW_PROJECT_DIR": str(tmp_path),
        "TENANTFLOW_STACK_DIR": str(tmp_path / ".stack"),
    }


@pytest.fixture
def closed_env(tmp_path: Path) -> dict[str, str]:
    pg, transaction, session, auth, prefect = free_ports(5)
    return {
        **_base_env(tmp_path),
        "TENANTFLOW_PG_PORT": str(pg),
        "TENANTFLOW_TRANSACTION_POOLER_PORT": str(transaction),
        "TENANTFLOW_SESSION_POOLER_PORT": str(session),
        "TENANTFLOW_AUTH_PORT": str(auth),
        "TENANTFLOW_PREFECT_PORT": str(prefect),
        "DATABASE_URL": f"postgresql://tenantflow_worker:x@127.0.0.1:{transaction}/postgres",
        "MIGRATION_DATABASE_URL": f"postgresql://postgres:x@127.0.0.1:{session}/postgres",
        "SUPABASE_URL": f"http://127.0.0.1:{auth}",
        "SUPABASE_ANON_KEY": "anon",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect}/api",
        "PREFECT_API_AUTH_STRING": "tenantflow:x",
    }


#: The dev stack's commands, run by `tenantflow-dev`; the others are the product's.
DEV_COMMANDS = ("up", "down", "status", "restart", "token")


def _run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert not (cwd / ".env").exists()
    command = next(arg for arg in args if not arg.startswith("-"))
    module = "tenantflow_dev.cli" if command in DEV_COMMANDS else "tenantflow.cli"
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("migrate", "--dry-run"), "the session pooler at 127.0.0.1:{session} does not answer"),
        (("migrate",), "the session pooler at 127.0.0.1:{session} does not answer"),
        (("deploy",), "the Prefect API at http://127.0.0.1:{prefect}/api does not answer"),
        (("token", "--email", "x", "--flow", "f"), "PostgreSQL at 127.0.0.1:{pg} does not"),
    ],
)
def test_an_unreachable_server_is_one_line(
    closed_env: dict[str, str], tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    line = _one_line(_run(closed_env, tmp_path, *args))
    ports = {
        "session": closed_env["TENANTFLOW_SESSION_POOLER_PORT"],
        "prefect": closed_env["TENANTFLOW_PREFECT_PORT"],
        "pg": closed_env["TENANTFLOW_PG_PORT"],
    }
    assert expected.format(**ports) in line
    assert HINT in line


def test_status_of_a_stack_that_is_down(closed_env: dict[str, str], tmp_path: Path) -> None:
    result = _run(closed_env, tmp_path, "status")
    assert result.returncode == 3
    assert result.stderr == ""
    # Seven parts, the tenant and the migrate worker among them.
    assert result.stdout.count("DOWN") == 7


def test_missing_and_bad_settings(closed_env: dict[str, str], tmp_path: Path) -> None:
    missing = _one_line(_run(_base_env(tmp_path), tmp_path, "migrate", "--dry-run"))
    assert missing.startswith("error: settings: ")
    assert "DATABASE_URL" in missing and "`make up` writes .env" in missing
    # Only where migrations run is the owner's login set; anywhere else, migrate says so.
    tenant_worker = {k: v for k, v in closed_env.items() if k != "MIGRATION_DATABASE_URL"}
    unset = _one_line(_run(tenant_worker, tmp_path, "migrate", "--dry-run"))
    assert unset.startswith("error: settings: MIGRATION_DATABASE_URL is not set"), unset

    bad = {**closed_env, "MIGRATION_DATABASE_URL": "mysql://someone@db/x"}
    assert "MIGRATION_DATABASE_URL" in _one_line(_run(bad, tmp_path, "migrate", "--dry-run"))

    no_key = _one_line(_run(closed_env, tmp_path, "seal-key", "public"))
    assert "SEAL_PRIVATE_KEYS is not set" in no_key and "make up" in no_key


def test_a_refused_operation_is_one_line(closed_env: dict[str, str], tmp_path: Path) -> None:
    result = _run(closed_env, tmp_path, "migrate", "--downgrade-to", "base")
    assert result.returncode == 2
    assert "--yes" in _one_line(result)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(closed_env: dict[str, str], tmp_path: Path, where: str) -> None:
    args = ["migrate", "--dry-run"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    result = _run(closed_env, tmp_path, *args)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "MigrationError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: the session pooler")


def test_anything_else_names_its_class_and_first_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.report_failure(RuntimeError("boom\nsecond line"), debug=False) == 1
    assert capsys.readouterr().err == (
        "error: RuntimeError: boom (run with --debug for the traceback)\n"
    )
    try:
        raise KeyError("k")
    except KeyError as error:
        assert cli.report_failure(error, debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "error: KeyError: 'k'"
