"""Where a local stack writes its `.env` (no stack is started)."""

from __future__ import annotations

from pathlib import Path

from tenantflow_dev.config import StackConfig


def test_only_the_projects_own_stack_writes_the_projects_env(tmp_path: Path) -> None:
    own = StackConfig(project_dir=tmp_path, stack_dir=tmp_path / ".stack")
    second = StackConfig(project_dir=tmp_path, stack_dir=tmp_path / ".stack-second")
    elsewhere = StackConfig(project_dir=tmp_path, stack_dir=tmp_path / "x" / ".stack")
    assert own.env_file == tmp_path / ".env"
    assert second.env_file == tmp_path / ".stack-second" / ".env"
    assert elsewhere.env_file == tmp_path / "x" / ".stack" / ".env"
    assert list(tmp_path.iterdir()) == []  # nothing was written
