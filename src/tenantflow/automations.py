"""The automations the bootstrap owns: zombie and never-started runs marked Crashed, and
operators' alerts.

* `zombie_automation()`: a deployment's flow run with no heartbeat (nor a final, paused
  or suspended state) for `ZOMBIE_AFTER_S` is set Crashed, which frees its concurrency
  slot.
* `stuck_start_automation()`: a deployment's flow run a worker took (Pending, Submitting)
  but that is not Running `STUCK_START_AFTER_S` later is set Crashed (its worker died
  before starting it).
* `alert_automations()`: with `ALERT_WEBHOOK_URL` set, a POST through the notification
  block `tenantflow-alerts` when `nightly-rollup` ends Failed or Crashed, and when none
  has Completed for `NIGHTLY_LATE_AFTER_S`.
* `housekeeping_automation()`: with `ALERT_WEBHOOK_URL` set, a POST through the same block
  for every event of the worker's housekeeping (`HOUSEKEEPING_EVENTS`: a schedule slot
  squatted or missed, a concurrency limit full with nobody holding it), its subject and
  body taken from the event, which names the night or the limit.
* `ensure_automations()`: creates, updates (by name) or removes them; `bootstrap()` in
  `tenantflow.deployments` calls it.

Settings, behaviour and caveats: docs/operations.md (*Zombie runs and alerts*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from tenantflow.settings import FaultSettings

__all__ = [
    "ALERT_BLOCK",
    "AUTOMATIONS",
    "HOUSEKEEPING_EVENTS",
    "NIGHTLY_DEPLOYMENT",
    "Alerts",
    "Outcome",
    "alert_automations",
    "ensure_automations",
    "housekeeping_automation",
    "stuck_start_automation",
    "zombie_automation",
]

#: What the bootstrap did to one object.
Outcome = Literal["created", "updated", "unchanged", "removed"]

#: The deployment whose failures and silence operators hear about.
NIGHTLY_DEPLOYMENT = "nightly-rollup"
#: The notification block the alert automations send through (holds the URL as a secret).
ALERT_BLOCK = "tenantflow-alerts"
#: The automations the bootstrap owns, by role.
AUTOMATIONS = {
    "zombie": "tenantflow-crash-zombie-flow-runs",
    "stuck": "tenantflow-crash-never-started-flow-runs",
    "failed": "tenantflow-nightly-rollup-failed",
    "late": "tenantflow-nightly-rollup-late",
    "housekeeping": "tenantflow-housekeeping-alerts",
}
#: The events the worker's housekeeping (`tenantflow.housekeeping`) emits, by role. Each
#: carries `subject` and `message` in its payload, which the alert sends as they are.
HOUSEKEEPING_EVENTS = {
    "limit_stuck": "tenantflow.concurrency-limit.stuck",
    "slot_squatted": "tenantflow.schedule.slot-squatted",
    "slot_missed": "tenantflow.schedule.slot-missed",
}
#: The final states of a flow run, and those in which its process may rightly be gone.
_QUIET_STATES = ("Completed", "Failed", "Cancelled", "Crashed", "Paused", "Suspended")


@dataclass(frozen=True)
class Alerts:
    """What the automations are made of (`FaultSettings`, in seconds).

    `webhook_url` may hold a token: it goes into the notification block's secrets only,
    and never into a log, a summary or an automation.
    """

    zombie_after_s: int = 90
    stuck_start_after_s: int = 600
    nightly_late_after_s: int = 26 * 3600
    webhook_url: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: FaultSettings) -> Alerts:
        url = settings.alert_webhook_url
        return cls(
            zombie_after_s=settings.zombie_after_s,
            stuck_start_after_s=settings.stuck_start_after_s,
            nightly_late_after_s=settings.nightly_late_after_s,
            webhook_url=url.get_secret_value() if url is not None else None,
        )


def _crash_unless(
    name: str, description: str, *, after: set[str], expect: set[str], seconds: int, message: str
) -> Any:
    """An automation that sets a deployment's flow run Crashed with `message` when, after
    one of its `after` events, none of `expect` follows within `seconds` (proactive, one
    bucket per flow run)."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=name,
        description=description,
        trigger=EventTrigger(
            after=after,
            expect=expect,
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification(
                {
                    "prefect.resource.role": "deployment",
                    "prefect.resource.id": "prefect.deployment.*",
                }
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message)],
    )


def zombie_automation(alerts: Alerts) -> Any:
    """Mark Crashed a deployment's flow run whose heartbeats stopped (a zombie).

    As Prefect documents it: after a flow run's `Running` or heartbeat event, another
    heartbeat (or a state in which the process may be gone) is expected within
    `zombie_after_s`; otherwise the run's process or machine died, and the run is set
    Crashed. Only runs of deployments: a flow called in-process (a test, a script) keeps
    Prefect's default heartbeat (180 s), which a short window would take for a zombie.
    """
    return _crash_unless(
        AUTOMATIONS["zombie"],
        "tenantflow: a deployment's flow run without a heartbeat for "
        f"{alerts.zombie_after_s}s is marked Crashed (its worker or machine died).",
        after={"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat"}
        | {f"prefect.flow-run.{state}" for state in _QUIET_STATES},
        seconds=alerts.zombie_after_s,
        message=(
            f"No heartbeat from this flow run for {alerts.zombie_after_s}s: its process "
            "or machine is gone (killed, evicted, rebooted). Marked Crashed by "
            "tenantflow's zombie detection; start the run again."
        ),
    )


def stuck_start_automation(alerts: Alerts) -> Any:
    """Mark Crashed a deployment's flow run that a worker took but that never started.

    A worker takes a run (`Pending`), prepares it (`Submitting`) and starts its process or
    container, whose engine sets it `Running`. A worker killed in between (its machine or
    container gone) leaves the run taken by nobody, before any heartbeat the zombie
    automation could miss: after `Pending` or `Submitting`, `Running` (or a final state)
    is expected within `stuck_start_after_s`; otherwise the run is set Crashed, which a
    sweep's parent retries as it retries a zombie shard.
    """
    return _crash_unless(
        AUTOMATIONS["stuck"],
        "tenantflow: a deployment's flow run taken by a worker but not Running "
        f"{alerts.stuck_start_after_s}s later is marked Crashed (its worker died first).",
        after={"prefect.flow-run.Pending", "prefect.flow-run.Submitting"},
        expect={"prefect.flow-run.Running"}
        | {f"prefect.flow-run.{state}" for state in _QUIET_STATES},
        seconds=alerts.stuck_start_after_s,
        message=(
            f"Taken by a worker but not started within {alerts.stuck_start_after_s}s: "
            "the worker died before starting it, or its container never came up. "
            "Marked Crashed by tenantflow's automation; start the run again."
        ),
    )


_FAILED_SUBJECT = "tenantflow: {{ flow_run.name }} of nightly-rollup is {{ flow_run.state.name }}"
_FAILED_BODY = """\
The nightly-rollup flow run {{ flow_run.name }} ended {{ flow_run.state.name }}.
State message: {{ flow_run.state.message }}
Flow run: {{ flow_run|ui_url }}
Flow run id: {{ flow_run.id }}
Started: {{ flow_run.start_time }}"""
_LATE_SUBJECT = "tenantflow: nightly-rollup is late or missing"


def _late_body(seconds: int) -> str:
    window = f"{seconds // 3600} hours" if seconds % 3600 == 0 else f"{seconds}s"
    return (
        f"No nightly-rollup flow run has completed in the last {window} (it is scheduled "
        "daily at 02:15 UTC). Check the deployment's runs and its worker in the Prefect UI."
    )


def _each_event(expect: set[str], *, match: Any, match_related: Any = None) -> Any:
    """A reactive trigger that fires once for every event named in `expect` (per resource)."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    related = {} if match_related is None else {"match_related": match_related}
    return EventTrigger(
        expect=expect,
        match=match,
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(seconds=0),
        **related,
    )


def alert_automations(alerts: Alerts, block_id: Any) -> list[Any]:
    """Operators' alerts through the notification block `block_id`.

    * `failed`: a run of `nightly-rollup` ended Failed or Crashed (reactive, one
      notification per run);
    * `late`: no run of `nightly-rollup` reached Completed within `nightly_late_after_s`
      (proactive, so a missing run is noticed as well as a failed one).
    """
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    nightly_run = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
    of_nightly = ResourceSpecification(
        {"prefect.resource.role": "deployment", "prefect.resource.name": NIGHTLY_DEPLOYMENT}
    )
    return [
        AutomationCore(
            name=AUTOMATIONS["failed"],
            description="tenantflow: tell operators when a nightly-rollup run fails or crashes.",
            trigger=_each_event(
                {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match=nightly_run,
                match_related=of_nightly,
            ),
            actions=[
                SendNotification(
                    block_document_id=block_id, subject=_FAILED_SUBJECT, body=_FAILED_BODY
                )
            ],
        ),
        AutomationCore(
            name=AUTOMATIONS["late"],
            description=(
                "tenantflow: tell operators when no nightly-rollup run has completed for "
                f"{alerts.nightly_late_after_s}s."
            ),
            trigger=EventTrigger(
                expect={"prefect.flow-run.Completed"},
                match=nightly_run,
                match_related=of_nightly,
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=alerts.nightly_late_after_s),
            ),
            actions=[
                SendNotification(
                    block_document_id=block_id,
                    subject=_LATE_SUBJECT,
                    body=_late_body(alerts.nightly_late_after_s),
                )
            ],
        ),
    ]


_HOUSEKEEPING_SUBJECT = "{{ event.payload.subject }}"
_HOUSEKEEPING_BODY = """\
{{ event.payload.message }}
Event: {{ event.event }} ({{ event.id }}), {{ event.occurred }}"""


def housekeeping_automation(block_id: Any) -> Any:
    """Operators' alert for every housekeeping event, through the notification block
    `block_id`: one notification per event (reactive). The housekeeper emits each finding
    once (one event per night, per squatter, per stuck limit), so this sends it once."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=AUTOMATIONS["housekeeping"],
        description=(
            "tenantflow: tell operators what the worker's housekeeping found (a schedule slot "
            "squatted or missed, a concurrency limit full with nobody holding it)."
        ),
        trigger=_each_event(set(HOUSEKEEPING_EVENTS.values()), match=ResourceSpecification({})),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=_HOUSEKEEPING_SUBJECT,
                body=_HOUSEKEEPING_BODY,
            )
        ],
    )


async def _save_alert_block(webhook_url: str) -> Any:
    """The notification block that POSTs {subject, body, source} as JSON; its id.

    NOTE: the URL is a secret value of the block (it may carry a token), substituted into
    the block's `url` only when a notification is sent.
    """
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.types import SecretDict

    block = CustomWebhookNotificationBlock(
        name="tenantflow alerts",
        url="{{alert_url}}",
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "tenantflow"},
        headers={"Content-Type": "application/json"},
        secrets=SecretDict({"alert_url": webhook_url}),
    )
    return await block.asave(ALERT_BLOCK, overwrite=True)


def _comparable(automation: Any) -> Any:
    """An automation as data to compare: no ids (triggers get a fresh one each time they
    are built), no server bookkeeping, and sets (dumped as lists) in a fixed order."""

    def normal(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: normal(v) for k, v in value.items() if k != "id"}
        if isinstance(value, list):
            items = [normal(v) for v in value]
            return sorted(items) if all(isinstance(v, str) for v in items) else items
        return value

    return normal(
        automation.model_dump(mode="json", exclude={"created", "updated", "owner_resource"})
    )


async def _ensure_automation(client: Any, wanted: Any) -> Outcome:
    """Create `wanted`, or update the automation of its name in place; drop duplicates."""
    existing = await client.read_automations_by_name(wanted.name)
    if not existing:
        await client.create_automation(wanted)
        return "created"
    first, *duplicates = existing
    for duplicate in duplicates:
        # NOTE: two bootstraps racing may both create one; keep a single automation.
        await client.delete_automation(duplicate.id)
    if _comparable(first) == _comparable(wanted) and not duplicates:
        return "unchanged"
    await client.update_automation(first.id, wanted)
    return "updated"


async def _remove_automation(client: Any, name: str) -> Outcome | None:
    existing = await client.read_automations_by_name(name)
    for automation in existing:
        await client.delete_automation(automation.id)
    return "removed" if existing else None


async def ensure_automations(client: Any, alerts: Alerts) -> dict[str, Outcome]:
    """Create, update or remove the bootstrap's automations; what happened to each, by name."""
    done: dict[str, Outcome] = {}
    done[AUTOMATIONS["zombie"]] = await _ensure_automation(client, zombie_automation(alerts))
    done[AUTOMATIONS["stuck"]] = await _ensure_automation(client, stuck_start_automation(alerts))
    if not alerts.webhook_url:
        # NOTE: without a destination there is nothing to send: earlier alert automations
        # are removed, so unsetting the URL turns alerts off.
        for role in ("failed", "late", "housekeeping"):
            if (outcome := await _remove_automation(client, AUTOMATIONS[role])) is not None:
                done[AUTOMATIONS[role]] = outcome
        return done
    block_id = await _save_alert_block(alerts.webhook_url)
    for automation in [*alert_automations(alerts, block_id), housekeeping_automation(block_id)]:
        done[automation.name] = await _ensure_automation(client, automation)
    return done
