"""What other OS users, the worker's included, can read of the stack.

The Prefect server's folder (and SQLite database, when it uses one) is root's only; when
the stack runs as root the tenant worker (and so every tenant flow run) is the unprivileged
`tenantflow` user, which reads the project but neither the stack's secrets file, `.env`
(which holds the schema owner's login), the Prefect server's folder, nor anything of the
migrate worker, which runs as `tenantflow-migrate`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tenantflow_dev import Stack
from tenantflow_dev.worker import LocalWorker

pytestmark = [pytest.mark.stack]

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the stack drops privileges as root only")


def _ids(pid: int) -> tuple[list[int], list[int]]:
    """Real, effective, saved and file-system uids and gids of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = [int(v) for v in value.split()] if key in {"Uid", "Gid"} else value
    return fields["Uid"], fields["Gid"]  # type: ignore[return-value]


def _as_worker_user(*argv: str) -> subprocess.CompletedProcess[str]:
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return subprocess.run(
        [runuser, "-u", "tenantflow", "--", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_prefect_servers_files_are_root_only(stack: Stack) -> None:
    home = stack.config.prefect_home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    files = [p for p in home.rglob("*") if p.is_file()]
    assert home / "server.log" in files
    database = home / "prefect.db"
    if stack.config.prefect_database == "sqlite":
        assert database in files
    else:
        # Its data is in the cluster's database `prefect`, not in this folder.
        assert database not in files
    loose = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if p.stat().st_mode & 0o077}
    assert loose == {}
    assert stat.S_IMODE(stack.config.secrets_file.stat().st_mode) == 0o600


@as_root
@pytest.mark.parametrize(
    ("migrate", "user"),
    [(False, "tenantflow"), (True, "tenantflow-migrate")],
    ids=["tenant", "migrate"],
)
def test_each_worker_runs_as_an_unprivileged_user_of_its_own(
    stack: Stack, migrate: bool, user: str
) -> None:
    worker_service = LocalWorker.for_migrate(stack.config) if migrate else LocalWorker(stack.config)
    pid = worker_service.pid()
    assert pid is not None
    worker = pwd.getpwnam(user)
    assert worker.pw_uid != 0
    assert (
        worker.pw_uid != pwd.getpwnam("tenantflow-migrate" if not migrate else "tenantflow").pw_uid
    )
    uids, gids = _ids(pid)
    assert uids == [worker.pw_uid] * 4
    assert gids == [worker.pw_gid] * 4
    groups = next(
        line.split(":", 1)[1].split()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Groups:")
    )
    assert groups == []


@as_root
def test_the_worker_user_cannot_read_the_stacks_secrets(stack: Stack) -> None:
    config = stack.config
    for path in (
        config.secrets_file,
        config.prefect_home / "prefect.db",
        config.prefect_home / "prefect.db-wal",
    ):
        if not path.exists():
            continue
        denied = _as_worker_user("cat", str(path))
        assert denied.returncode != 0, path
        assert "Permission denied" in denied.stderr
        assert denied.stdout == ""
    listing = _as_worker_user("ls", str(config.prefect_home))
    assert listing.returncode != 0
    # Nor `.env`, which holds the schema owner's login, nor the migrate worker's home.
    for command, path in (("cat", config.env_file), ("ls", LocalWorker.for_migrate(config).home)):
        denied = _as_worker_user(command, str(path))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, path
        assert denied.stdout == ""
    # What its flow runs need, it can read.
    for path in (
        config.project_dir / "prefect.yaml",
        config.project_dir / "flows" / "nightly_rollup.py",
    ):
        assert _as_worker_user("cat", str(path)).returncode == 0, path
    # And nothing it may not write.
    assert _as_worker_user("touch", str(config.prefect_home / "x")).returncode != 0
    assert _as_worker_user("touch", str(config.project_dir / "flows" / "x.py")).returncode != 0
