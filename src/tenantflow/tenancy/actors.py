"""Who acts in a flow run, and the proof that the guard let them act on one client.

An `Actor` is settled once per run by the guard (`tenantflow.tenancy.guard`): the
scheduler, an operator or a user. A `TenantContext` is the guard's answer for one
client; only the guard's own modules can issue one, and tenant work takes nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final
from uuid import UUID

from tenantflow.auth import VerifiedClaims
from tenantflow.errors import TenantflowError

__all__ = ["AccessDenied", "Actor", "ActorKind", "TenantContext"]


class ActorKind(StrEnum):
    USER = "user"
    OPERATOR = "operator"
    SCHEDULER = "scheduler"


@dataclass(frozen=True)
class Actor:
    kind: ActorKind
    user_id: UUID | None = None
    email: str | None = None
    claims: VerifiedClaims | None = field(default=None, repr=False, compare=False)
    #: The scheduler only: the slot its schedule fired for (what `day` defaults from).
    slot: datetime | None = None

    def describe(self) -> str:
        if self.kind is ActorKind.SCHEDULER:
            return "the deployment's schedule"
        return f"{self.kind.value} {self.email or self.user_id}"


class AccessDenied(TenantflowError):
    """The run may not touch the client's data. The message is safe to show an operator."""


# NOTE: private to the tenancy package: the guard (`guard`, `shards`) issues contexts with
# it, and `sessions` and `shards` check it; nothing outside the package imports it.
_SEAL: Final = object()


@dataclass(frozen=True)
class TenantContext:
    """Proof that the guard allowed `actor` to act on `client_id` in this flow run."""

    actor: Actor
    client_id: UUID
    client_name: str
    flow_run_id: UUID | None
    membership_role: str | None = None
    seal: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.seal is not _SEAL:
            raise AccessDenied("a TenantContext is issued by the tenant guard only")

    @property
    def label(self) -> str:
        return f"{self.client_name} ({self.client_id})"
