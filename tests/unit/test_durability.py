"""The local stack's PostgreSQL is durable unless it is a throwaway test cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenantflow_dev.config import StackConfig
from tenantflow_dev.postgres import DURABILITY_SETTINGS, Postgres

OLD_CONF = (
    "# the cluster's defaults\n"
    "#fsync = on\n"
    "\n# tenantflow local stack\n"
    "max_connections = 300\n"
    "fsync = off\n"
    "synchronous_commit = off\n"
    "full_page_writes = off\n"
    "log_line_prefix = '%m [%p] %q%u@%d '\n"
)


def _postgres(tmp_path: Path, *, throwaway: bool) -> Postgres:
    config = StackConfig(project_dir=tmp_path, stack_dir=tmp_path / ".stack", throwaway=throwaway)
    return Postgres(config)


def test_a_stack_cluster_keeps_durability_on(tmp_path: Path) -> None:
    text = _postgres(tmp_path, throwaway=False).conf_text()
    for name in DURABILITY_SETTINGS:
        assert name not in text  # PostgreSQL's defaults: on
    assert "throwaway" not in text


def test_a_throwaway_cluster_says_so_and_turns_them_off(tmp_path: Path) -> None:
    text = _postgres(tmp_path, throwaway=True).conf_text()
    assert "NOTE: a throwaway test cluster" in text
    for name in DURABILITY_SETTINGS:
        assert f"\n{name} = off\n" in text


def test_throwaway_comes_from_the_environment_only_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TENANTFLOW_THROWAWAY_CLUSTER", raising=False)
    assert StackConfig.from_env().throwaway is False
    monkeypatch.setenv("TENANTFLOW_THROWAWAY_CLUSTER", "1")
    config = StackConfig.from_env()
    assert config.throwaway is True
    assert config.location_environment()["TENANTFLOW_THROWAWAY_CLUSTER"] == "1"


@pytest.mark.parametrize("throwaway", [False, True])
def test_an_old_clusters_conf_is_made_durable_unless_throwaway(
    tmp_path: Path, throwaway: bool
) -> None:
    postgres = _postgres(tmp_path, throwaway=throwaway)
    postgres.data.mkdir(parents=True)
    conf = postgres.data / "postgresql.conf"
    conf.write_text(OLD_CONF)
    changed = postgres._durable_conf()
    text = conf.read_text()
    if throwaway:
        assert not changed and text == OLD_CONF
        return
    assert changed
    for name in DURABILITY_SETTINGS:
        assert f"{name} = off" not in text
    assert "#fsync = on" in text and "max_connections = 300" in text
    assert not postgres._durable_conf()  # idempotent
