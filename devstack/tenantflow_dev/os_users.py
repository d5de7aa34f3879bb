"""Which OS user runs what when the stack is started by root.

PostgreSQL and PgBouncer refuse to run as root, so their processes run as the
unprivileged `postgres` OS user (created by Debian's PostgreSQL packages) and own their
folders. The process workers run flow runs, whose parameters and job variables come from
whoever can reach the Prefect API, so the tenant worker runs as the unprivileged
`tenantflow` OS user and the `migrate` pool's worker as `tenantflow-migrate` (each created
here when missing): a tenant flow run cannot read the migrate worker's environment, which
holds the schema owner's login. Started by anyone else, every process stays that user's.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from tenantflow_dev.config import SERVICE_USER, WORKER_USER
from tenantflow_dev.errors import StackError

__all__ = [
    "as_service_user",
    "grant_traversal",
    "running_as_root",
    "service_dir",
    "service_user_ids",
    "worker_user_ids",
]

log = logging.getLogger("tenantflow_dev")


def running_as_root() -> bool:
    return os.geteuid() == 0


def service_user_ids() -> tuple[int, int] | None:
    """uid/gid of the unprivileged service user, when running as root."""
    if not running_as_root():
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise StackError(
            f"running as root needs the '{SERVICE_USER}' OS user (Debian's postgresql "
            "package creates it); run `make up` to install it"
        ) from None
    return entry.pw_uid, entry.pw_gid


def as_service_user(argv: list[str]) -> list[str]:
    if running_as_root():
        return ["runuser", "-u", SERVICE_USER, "--", *argv]
    return argv


def grant_traversal(path: Path) -> None:
    """Let other OS users traverse (not list) every folder above `path`.

    NOTE: a clone under a private folder (mktemp -d is 0700) would hide the stack from
    the service users; traversal alone reveals no names.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
            log.info("granted other users traversal (o+x) of %s", parent)


def service_dir(path: Path) -> Path:
    """Create a folder the service user owns, and make sure it can reach it."""
    path.mkdir(parents=True, exist_ok=True)
    ids = service_user_ids()
    if ids is not None:
        os.chown(path, *ids)
        grant_traversal(path)
    path.chmod(0o700)
    return path


def worker_user_ids(user: str = WORKER_USER) -> tuple[int, int] | None:
    """uid/gid of a worker's OS user when running as root (created when missing)."""
    if not running_as_root():
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        result = subprocess.run(  # noqa: S603
            [
                shutil.which("useradd") or "/usr/sbin/useradd",
                "--system",
                "--no-create-home",
                "--user-group",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                user,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            # NOTE: another stack may have created it meanwhile (useradd then exits 9).
            entry = pwd.getpwnam(user)
        except KeyError:
            output = (result.stderr or result.stdout).strip()
            raise StackError(
                f"could not create the '{user}' OS user for the worker: {output}"
            ) from None
    return entry.pw_uid, entry.pw_gid
