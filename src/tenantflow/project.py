"""The project as it declares itself: the deployments of its `prefect.yaml`.

What may run, and how the scheduler may run it, is what this file says: the worker
(`tenantflow.worker`) and the tenant guard (`tenantflow.tenancy`) read their own copy of
the project, never what the Prefect API says a deployment is, since the API can be told
anything by whoever reaches it. Reading it needs no Prefect client, so a flow run pays
for nothing else.

How the worker uses it: docs/security.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml  # type: ignore[import-untyped]

from tenantflow.errors import TenantflowError

__all__ = [
    "PROJECT_DIR_ENV",
    "DeclaredDeployment",
    "DeclaredSchedule",
    "DeployError",
    "declared_deployment",
    "deployment_names",
    "scheduler_key",
    "slot_of_key",
]

#: The folder that holds `prefect.yaml` and `flows/`, named at run time (the image: `/app`).
PROJECT_DIR_ENV = "TENANTFLOW_PROJECT_DIR"


class DeployError(TenantflowError, RuntimeError):
    """The project's deployments could not be read, or `prefect deploy` failed."""


def deployment_names(project_dir: Path) -> list[str]:
    """The deployment names declared in the project's `prefect.yaml`, in order."""
    path = project_dir / "prefect.yaml"
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DeployError(f"cannot read {path}: {error}") from None
    return [str(entry["name"]) for entry in document.get("deployments") or []]


@dataclass(frozen=True)
class DeclaredSchedule:
    """A schedule as `prefect.yaml` declares it (what the scheduler may run, exactly)."""

    slug: str
    cron: str
    timezone: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class DeclaredDeployment:
    name: str
    entrypoint: str
    parameters: dict[str, Any]
    schedules: tuple[DeclaredSchedule, ...]
    #: The work pool `prefect.yaml` puts it on: the only pool whose worker runs it.
    work_pool: str | None = None

    def schedule(self, slug: str | None) -> DeclaredSchedule | None:
        return next((s for s in self.schedules if slug and s.slug == slug), None)


def declared_deployment(name: str, project_dir: Path | None = None) -> DeclaredDeployment | None:
    """The deployment `name` as this project's `prefect.yaml` declares it, or None.

    The worker reads its own copy of the project (the folder its flow runs start in,
    `TENANTFLOW_PROJECT_DIR`), never what the Prefect API says a deployment is: the API
    can be told anything by whoever reaches it.

    Raises:
        DeployError: `prefect.yaml` is missing or unreadable.
    """
    folder = project_dir or Path(os.environ.get(PROJECT_DIR_ENV) or Path.cwd())
    path = folder / "prefect.yaml"
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DeployError(f"cannot read {path}: {error}") from None
    for entry in document.get("deployments") or []:
        if entry.get("name") != name:
            continue
        schedules = tuple(
            DeclaredSchedule(
                slug=str(schedule["slug"]),
                cron=str(schedule["cron"]),
                timezone=str(schedule.get("timezone") or "UTC"),
                parameters=dict(schedule.get("parameters") or {}),
            )
            for schedule in entry.get("schedules") or []
            if schedule.get("slug") and schedule.get("cron")
        )
        pool = entry.get("work_pool") or {}
        return DeclaredDeployment(
            name=name,
            entrypoint=str(entry.get("entrypoint")),
            parameters=dict(entry.get("parameters") or {}),
            schedules=schedules,
            work_pool=str(pool["name"]) if isinstance(pool, dict) and pool.get("name") else None,
        )
    return None


def scheduler_key(deployment_id: UUID, schedule_id: UUID, slot: datetime) -> str:
    """The idempotency key Prefect's scheduler gives the run of `slot` (its own format:
    `str()` of the slot in the schedule's time zone). API clients cannot change a run's
    key, as they can change its scheduled time."""
    return f"scheduled {deployment_id} {schedule_id} {slot}"


def slot_of_key(
    key: str | None, *, deployment_id: UUID | None = None, schedule_id: UUID | None = None
) -> datetime | None:
    """The slot (time-zone aware) a key of `scheduler_key`'s form names, or None; with ids,
    only a key of that deployment and schedule."""
    parts = (key or "").split(" ", 3)
    if len(parts) != 4 or parts[0] != "scheduled":
        return None
    if deployment_id is not None and parts[1] != str(deployment_id):
        return None
    if schedule_id is not None and parts[2] != str(schedule_id):
        return None
    try:
        slot = datetime.fromisoformat(parts[3])
    except ValueError:
        return None
    return slot if slot.tzinfo is not None else None
