"""The worker's housekeeping: what whoever holds the Prefect API auth string leaves behind.

A loop beside the tenantflow worker (`run_housekeeping`), one pass at a time
(`housekeep_once`), with the worker's own Prefect client and its own copy of the project
(`tenantflow.project`), never what the API says a deployment is:

* **Sealed values left in finished runs.** A run of a declared deployment that reached a
  final state (Completed, Failed, Crashed, Cancelled) no longer needs its `access_token`:
  the stored value is replaced with `SPENT`, so a seal left in a run that was cancelled
  before it started cannot be copied into another run later. A plain JWT found in the
  `access_token` of a run in any state is replaced with `run_token.REDACTED` at once.
  Runs still waiting (Scheduled, Pending...) keep their sealed value: they need it.
* **Schedule slots taken or missed.** Prefect's scheduler gives each run it creates the
  idempotency key `scheduled <deployment id> <schedule id> <slot>`, and inserts nothing
  for a slot whose key a run already holds. A run created through the API with that key
  (a squatter: not `auto_scheduled`) is deleted while it has not started, so the
  scheduler creates the real run on its next pass; the night is named in an event either
  way. A past slot of a declared schedule with no scheduled run (or whose run never
  started) is named too, once per night.
* **A concurrency limit full with nobody holding it.** `active_slots` of `tenantflow-db`
  can be set through the API; runs then wait for slots no run holds. Prefect 3.9's API
  does not show the leases of a global limit, so the housekeeper compares the slots taken
  with what the project's running flow runs can hold (`DB_FLOW_SLOTS` each): more, for
  longer than `LIMIT_STUCK_AFTER_S`, is reported once per incident. It never resets the
  limit: it cannot prove that no lease holds the slots.

Findings are Prefect events (`tenantflow.automations.HOUSEKEEPING_EVENTS`) with a
deterministic id per night, squatter or incident, emitted once (looked up first, and
remembered in `HousekeepingState`), and a warning in the log; the bootstrap's
`tenantflow-housekeeping-alerts` automation sends each to operators.

What an API holder can deny, and what is reported: docs/security.md; the alerts:
docs/operations.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo

import anyio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterId,
    FlowRunFilter,
    FlowRunFilterCreatedBy,
    FlowRunFilterDeploymentId,
    FlowRunFilterEndTime,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterIdempotencyKey,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger

from tenantflow.automations import HOUSEKEEPING_EVENTS
from tenantflow.project import (
    PROJECT_DIR_ENV,
    DeclaredDeployment,
    DeclaredSchedule,
    declared_deployment,
    deployment_names,
    scheduler_key,
    slot_of_key,
)
from tenantflow.sealing import looks_like_plain_jwt
from tenantflow.tenancy.run_token import REDACTED, SPENT

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import DeploymentSchedule
    from prefect.client.schemas.responses import DeploymentResponse

    from tenantflow.settings import FaultSettings

__all__ = [
    "FINAL_STATES",
    "SPENT",
    "Finding",
    "HousekeepingConfig",
    "HousekeepingReport",
    "HousekeepingState",
    "housekeep_once",
    "run_housekeeping",
    "schedule_slots",
]

#: Values that are already placeholders: never rewritten. (`SPENT` is what a finished
#: run's `access_token` is replaced with: its seal served, or will never serve, its one
#: run, and must not be copied into another.)
_PLACEHOLDERS: Final = frozenset({SPENT, REDACTED})
#: The states in which a run is over: its `access_token` is not needed any more.
FINAL_STATES: Final = (
    StateType.COMPLETED,
    StateType.FAILED,
    StateType.CRASHED,
    StateType.CANCELLED,
)
#: The states in which a run's flow may be holding database slots.
_HOLDING_STATES: Final = (StateType.RUNNING, StateType.CANCELLING)
_OPEN_STATES: Final = tuple(state for state in StateType if state not in FINAL_STATES)
#: How far ahead Prefect's scheduler creates runs at most (its default
#: `PREFECT_SERVER_SERVICES_SCHEDULER_MAX_SCHEDULED_TIME`), so how far ahead a squatted
#: key can matter; and its cap on the dates it looks at.
SCHEDULER_HORIZON: Final = timedelta(days=100)
_MAX_SLOTS: Final = 1000
#: Runs read per request (the Prefect server's default page limit), keys per filter.
_PAGE: Final = 200
_KEYS_PER_QUERY: Final = 100
#: Overlap between two passes over recently finished runs (clock skew with the server).
_OVERLAP: Final = timedelta(minutes=5)
#: Events the server keeps (`PREFECT_SERVER_EVENTS_RETENTION_PERIOD`, 7 days) and a day.
_EVENT_MEMORY: Final = timedelta(days=8)
#: The namespace of the findings' event ids: one id per night, squatter or incident.
_EVENT_NAMESPACE: Final = uuid.UUID("6f1d8c2e-4b7a-5e3f-9a10-7c2b8d4e6f01")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class HousekeepingConfig:
    """What the housekeeper looks after, and its windows.

    Attributes:
        project_dir: the folder whose `prefect.yaml` declares the deployments (default:
            `TENANTFLOW_PROJECT_DIR`, else the working directory), as the worker's.
        deployments: the declared deployments to look after, by name (default: all).
        limits: the global concurrency limits whose slots must have holders.
        flow_slots: slots one flow run holds at most (`DB_FLOW_SLOTS`).
        limit_stuck_after: how long slots may be taken with no holder before it is reported.
        slot_grace: how long after a schedule's slot its run must exist and have started.
        slot_lookback: how far back past slots are checked.
        tags: only runs carrying every one of these tags are rewritten or deleted (a test
            keeps to its own runs; empty in the worker).
    """

    project_dir: Path | None = None
    deployments: frozenset[str] | None = None
    limits: tuple[str, ...] = ("tenantflow-db",)
    flow_slots: int = 5
    limit_stuck_after: timedelta = timedelta(seconds=900)
    slot_grace: timedelta = timedelta(seconds=1800)
    slot_lookback: timedelta = timedelta(days=2)
    tags: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: FaultSettings, **changes: Any) -> HousekeepingConfig:
        """The worker's housekeeping: its database limit and windows from `settings`."""
        config = cls(
            limits=(settings.db_concurrency_limit,),
            flow_slots=settings.db_flow_slots,
            limit_stuck_after=timedelta(seconds=settings.limit_stuck_after_s),
            slot_grace=timedelta(seconds=settings.schedule_slot_grace_s),
        )
        return replace(config, **changes)


@dataclass
class HousekeepingState:
    """What one housekeeper remembers between passes (in memory, per process).

    Attributes:
        finished_since: the start of the last complete pass over finished runs; None
            before the first, which reads every finished run.
        stuck_since: per limit id, when its slots were first seen taken with no holder.
        watching_since: per (deployment, schedule slug), when this housekeeper first
            looked at it: slots after that are checked even if the schedule was replaced.
        emitted: the ids of the events sent (or found already sent).
    """

    finished_since: datetime | None = None
    stuck_since: dict[uuid.UUID, datetime] = field(default_factory=dict)
    watching_since: dict[tuple[str, str], datetime] = field(default_factory=dict)
    emitted: set[uuid.UUID] = field(default_factory=set)


@dataclass(frozen=True)
class Finding:
    """Something operators must hear of, as the event that tells them.

    `message` names the night (the deployment and the slot, in the schedule's time zone)
    or the limit; it never holds a parameter's value.
    """

    event: str
    event_id: uuid.UUID
    subject: str
    message: str
    resource: Mapping[str, str]
    related: tuple[Mapping[str, str], ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HousekeepingReport:
    """What one pass did and found.

    Attributes:
        spent: runs whose finished `access_token` was replaced with `SPENT`.
        redacted: runs whose plain JWT was replaced with `REDACTED`.
        squatters_deleted: runs deleted for holding a scheduler's key they were not given.
        findings: everything to report that this pass saw (new or already reported).
        emitted: the event ids this pass sent.
        full_pass: whether every finished run was read (the first pass).
    """

    spent: tuple[uuid.UUID, ...] = ()
    redacted: tuple[uuid.UUID, ...] = ()
    squatters_deleted: tuple[uuid.UUID, ...] = ()
    findings: tuple[Finding, ...] = ()
    emitted: tuple[uuid.UUID, ...] = ()
    full_pass: bool = False


# --------------------------------------------------------------------------- the loop


async def run_housekeeping(
    *,
    pool: str,
    interval_s: float | None = None,
    stop: anyio.Event | None = None,
    config: HousekeepingConfig | None = None,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
) -> None:
    """Run `housekeep_once` every `interval_s` (`HOUSEKEEPING_INTERVAL_S`) until `stop`
    is set (or the task is cancelled), beside the worker serving `pool`.

    A failed pass (the API unreachable, say) is logged and the next one runs as planned:
    housekeeping never stops the worker.

    Raises:
        SettingsError: the worker's settings are invalid (read once, before the first pass).
    """
    from tenantflow.settings import load_fault_settings

    # NOTE: the light settings only: housekeeping talks to Prefect, never to the database.
    settings = load_fault_settings()
    config = config or HousekeepingConfig.from_settings(settings)
    interval = interval_s if interval_s is not None else settings.housekeeping_interval_s
    log = logger or get_logger("tenantflow.housekeeping")
    state = HousekeepingState()
    log.info(
        "housekeeping for pool %s every %ss: deployments of %s, limits %s",
        pool,
        interval,
        _project_folder(config),
        ", ".join(config.limits) or "none",
    )
    stop = stop or anyio.Event()
    while not stop.is_set():
        try:
            report = await housekeep_once(config=config, state=state, logger=log)
        except Exception as error:
            # NOTE: logged, and the next pass tries again: housekeeping never stops the worker.
            # NOTE: only the exception's type and first line: Prefect's HTTP errors can
            # carry a request body, and a run's parameters hold sealed values.
            first = str(error).splitlines()[0][:200] if str(error) else ""
            log.warning("housekeeping pass failed (%s: %s)", type(error).__name__, first)
        else:
            if report.spent or report.redacted or report.squatters_deleted:
                log.info(
                    "housekeeping: %d finished runs' sealed values removed, %d plain tokens "
                    "redacted, %d squatter runs deleted",
                    len(report.spent),
                    len(report.redacted),
                    len(report.squatters_deleted),
                )
        with anyio.move_on_after(interval):
            await stop.wait()


async def housekeep_once(
    *,
    config: HousekeepingConfig | None = None,
    state: HousekeepingState | None = None,
    client: PrefectClient | None = None,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    now: datetime | None = None,
) -> HousekeepingReport:
    """One pass: scrub run parameters, look at the declared schedules and the limits,
    and emit what must be reported (each finding once).

    Args:
        config: what to look after (default: `HousekeepingConfig()`, the project's
            deployments and `tenantflow-db`).
        state: what earlier passes remember; a fresh one makes this a first pass (every
            finished run is read).
        client: a Prefect client to use (default: `get_client()`, the worker's settings).
        logger: where findings are logged as warnings.
        now: the housekeeper's clock for judging slots and windows (tests move it ahead
            to judge slots that have not come yet); events always carry the real time.
    """
    config = config or HousekeepingConfig()
    state = state if state is not None else HousekeepingState()
    log = logger or get_logger("tenantflow.housekeeping")
    clock = now or datetime.now(UTC)
    declared = _declared(config)
    async with _client(client) as api:
        deployments = await _api_deployments(api, declared)
        ids = [deployment.id for deployment in deployments]
        full = state.finished_since is None
        spent, redacted = await _scrub(api, ids, config, state, clock)
        squatters, slot_findings = await _watch_schedules(
            api, declared, deployments, config, state, clock
        )
        limit_findings = await _watch_limits(api, ids, config, state, clock)
        findings = (*slot_findings, *limit_findings)
        emitted = await _emit(api, findings, state, log)
    return HousekeepingReport(
        spent=tuple(spent),
        redacted=tuple(redacted),
        squatters_deleted=tuple(squatters),
        findings=findings,
        emitted=tuple(emitted),
        full_pass=full,
    )


class _client:
    """The given client as an async context manager that does not close it, or a new one."""

    def __init__(self, client: PrefectClient | None) -> None:
        self._given = client
        self._own: Any = None

    async def __aenter__(self) -> PrefectClient:
        if self._given is not None:
            return self._given
        self._own = get_client()
        client: PrefectClient = await self._own.__aenter__()
        return client

    async def __aexit__(self, *exc: object) -> None:
        if self._own is not None:
            await self._own.__aexit__(*exc)


# --------------------------------------------------------------------------- the project


def _project_folder(config: HousekeepingConfig) -> Path:
    return config.project_dir or Path(os.environ.get(PROJECT_DIR_ENV) or Path.cwd())


def _declared(config: HousekeepingConfig) -> dict[str, DeclaredDeployment]:
    """The declared deployments to look after, by name (from the worker's own project)."""
    folder = _project_folder(config)
    found: dict[str, DeclaredDeployment] = {}
    for name in deployment_names(folder):
        if config.deployments is not None and name not in config.deployments:
            continue
        if (declared := declared_deployment(name, folder)) is not None:
            found[name] = declared
    return found


async def _api_deployments(
    client: PrefectClient, declared: Mapping[str, DeclaredDeployment]
) -> list[DeploymentResponse]:
    """Every deployment in Prefect named as a declared one.

    NOTE: by name, as the worker decides what it runs: a deployment of another flow under
    a declared name runs the declared entrypoint, so its runs are the project's too.
    """
    if not declared:
        return []
    found: list[DeploymentResponse] = []
    offset = 0
    while True:
        page = await client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=list(declared))),
            limit=_PAGE,
            offset=offset,
        )
        found += page
        if len(page) < _PAGE:
            return found
        offset += _PAGE


async def _pages(client: PrefectClient, **filters: Any) -> AsyncIterator[list[FlowRun]]:
    """The flow runs matching `filters`, a page at a time (oldest id last)."""
    offset = 0
    while True:
        page = await client.read_flow_runs(
            **filters, sort=FlowRunSort.ID_DESC, limit=_PAGE, offset=offset
        )
        if page:
            yield page
        if len(page) < _PAGE:
            return
        offset += _PAGE


def _in_scope(run: FlowRun, config: HousekeepingConfig) -> bool:
    return set(config.tags) <= set(run.tags or ())


# --------------------------------------------------------------------------- parameters


def _replacement(value: Any, *, finished: bool) -> str | None:
    """What a stored `access_token` is to become, or None to leave it.

    A plain JWT is redacted in any state; once the run is over, any other value that is
    not a placeholder (a seal, whatever was pasted) is spent.
    """
    if value is None or (isinstance(value, str) and (not value or value in _PLACEHOLDERS)):
        return None
    if isinstance(value, str) and looks_like_plain_jwt(value):
        return REDACTED
    return SPENT if finished else None


async def _scrub(
    client: PrefectClient,
    deployment_ids: Sequence[uuid.UUID],
    config: HousekeepingConfig,
    state: HousekeepingState,
    clock: datetime,
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Replace plain JWTs (any state) and finished runs' sealed values, in runs of the
    declared deployments only; which runs were spent and which redacted."""
    spent: list[uuid.UUID] = []
    redacted: list[uuid.UUID] = []
    if not deployment_ids:
        state.finished_since = clock
        return spent, redacted
    started = clock
    of_ours = FlowRunFilterDeploymentId(any_=list(deployment_ids))
    tags = FlowRunFilterTags(all_=list(config.tags)) if config.tags else None
    open_runs = FlowRunFilter(
        deployment_id=of_ours,
        tags=tags,
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(_OPEN_STATES))),
    )
    finished = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(FINAL_STATES)))
    if state.finished_since is None:
        finished_runs = [FlowRunFilter(deployment_id=of_ours, tags=tags, state=finished)]
    else:
        # NOTE: a run that reached a final state since the last pass has an end time
        # after it (Prefect sets one on every final state, a run cancelled while
        # Scheduled included); one without an end time is looked at on every pass.
        since = state.finished_since - _OVERLAP
        finished_runs = [
            FlowRunFilter(
                deployment_id=of_ours,
                tags=tags,
                state=finished,
                end_time=FlowRunFilterEndTime(after_=since),
            ),
            FlowRunFilter(
                deployment_id=of_ours,
                tags=tags,
                state=finished,
                end_time=FlowRunFilterEndTime(is_null_=True),
            ),
        ]
    for flow_run_filter in (open_runs, *finished_runs):
        async for page in _pages(client, flow_run_filter=flow_run_filter):
            for run in page:
                if run.deployment_id not in deployment_ids or not _in_scope(run, config):
                    continue
                over = run.state_type in FINAL_STATES
                parameters = dict(run.parameters or {})
                new = _replacement(parameters.get("access_token"), finished=over)
                if new is None:
                    continue
                # NOTE: `parameters` replaces the whole dict: every other parameter is
                # written back as it was read.
                await client.update_flow_run(run.id, parameters={**parameters, "access_token": new})
                (redacted if new == REDACTED else spent).append(run.id)
    state.finished_since = started
    return spent, redacted


# --------------------------------------------------------------------------- schedules


def schedule_slots(schedule: DeclaredSchedule, start: datetime, end: datetime) -> list[datetime]:
    """The slots of a declared schedule from `start` to `end` (inclusive), in its time
    zone, computed by Prefect's own server code, as its scheduler does."""
    from prefect.server.schemas.schedules import CronSchedule

    cron = CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    return list(cron._get_dates_generator(n=_MAX_SLOTS, start=start, end=end))


def _utc(slot: datetime) -> datetime:
    """A slot as a plain UTC datetime, to compare and look up (Prefect's may be pendulum's)."""
    return datetime.fromtimestamp(slot.timestamp(), UTC)


def _key_slot(run: FlowRun) -> datetime | None:
    """The slot named by a run's scheduler-form idempotency key, if it has one."""
    slot = slot_of_key(run.idempotency_key)
    return _utc(slot) if slot is not None else None


def _scheduled_by(
    run: FlowRun, deployment_id: uuid.UUID, slug: str, schedule_ids: set[str]
) -> bool:
    """Whether Prefect's scheduler created `run` from the schedule `slug` (now or before
    a redeploy replaced it): `auto_scheduled` and `created_by` cannot be set through the
    API, and the key names this deployment and that schedule."""
    created_by = run.created_by
    if not run.auto_scheduled or created_by is None or created_by.type != "SCHEDULE":
        return False
    if str(created_by.id) not in schedule_ids and created_by.display_value != slug:
        return False
    return (
        slot_of_key(run.idempotency_key, deployment_id=deployment_id, schedule_id=created_by.id)
        is not None
    )


def _slot_text(slot: datetime, schedule: DeclaredSchedule) -> str:
    return f"{slot.astimezone(ZoneInfo(schedule.timezone)):%Y-%m-%d %H:%M} {schedule.timezone}"


def _event_id(*parts: object) -> uuid.UUID:
    return uuid.uuid5(_EVENT_NAMESPACE, " ".join(str(part) for part in parts))


def _deployment_resource(name: str, deployment: DeploymentResponse | None) -> dict[str, str]:
    ident = f"prefect.deployment.{deployment.id}" if deployment else f"tenantflow.deployment.{name}"
    return {"prefect.resource.id": ident, "prefect.resource.name": name}


def _flow_run_related(run_id: uuid.UUID) -> dict[str, str]:
    return {
        "prefect.resource.id": f"prefect.flow-run.{run_id}",
        "prefect.resource.role": "flow-run",
    }


@dataclass
class _Watched:
    """One declared schedule on one deployment in Prefect (or on none)."""

    name: str
    declared: DeclaredSchedule
    deployment: DeploymentResponse | None
    schedule: DeploymentSchedule | None


def _watched(
    declared: Mapping[str, DeclaredDeployment], deployments: Sequence[DeploymentResponse]
) -> list[_Watched]:
    watched: list[_Watched] = []
    for name, project in declared.items():
        in_prefect = [d for d in deployments if d.name == name]
        for schedule in project.schedules:
            if not in_prefect:
                watched.append(_Watched(name, schedule, None, None))
            for api in in_prefect:
                match = next((s for s in api.schedules or () if s.slug == schedule.slug), None)
                watched.append(_Watched(name, schedule, api, match))
    return watched


async def _runs_with_keys(
    client: PrefectClient, flow_id: uuid.UUID, keys: Sequence[str]
) -> list[FlowRun]:
    """Every run of the flow `flow_id` holding one of `keys` (whatever its deployment:
    Prefect's keys are unique per flow)."""
    found: list[FlowRun] = []
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        chunk = list(keys[start : start + _KEYS_PER_QUERY])
        async for page in _pages(
            client,
            flow_filter=FlowFilter(id=FlowFilterId(any_=[flow_id])),
            flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=chunk)),
        ):
            found += page
    return found


async def _scheduled_runs(
    client: PrefectClient, deployment_id: uuid.UUID, start: datetime, end: datetime
) -> list[FlowRun]:
    """The runs Prefect's schedules created for `deployment_id` between `start` and `end`."""
    found: list[FlowRun] = []
    async for page in _pages(
        client,
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            created_by=FlowRunFilterCreatedBy(type_=["SCHEDULE"]),
            expected_start_time=FlowRunFilterExpectedStartTime(after_=start, before_=end),
        ),
    ):
        found += page
    return found


def _never_ran(run: FlowRun) -> bool:
    """Whether the run's flow never started (Prefect counts a run's starts in `run_count`;
    its start time is set on cancelling too)."""
    return not run.run_count and run.state_type not in _HOLDING_STATES


async def _watch_schedules(
    client: PrefectClient,
    declared: Mapping[str, DeclaredDeployment],
    deployments: Sequence[DeploymentResponse],
    config: HousekeepingConfig,
    state: HousekeepingState,
    clock: datetime,
) -> tuple[list[uuid.UUID], list[Finding]]:
    """Delete squatters of the declared schedules' keys and name the nights they took,
    and name the past slots that have no scheduled run (or one that never started)."""
    deleted: list[uuid.UUID] = []
    findings: list[Finding] = []
    earliest = clock - config.slot_lookback
    for watched in _watched(declared, deployments):
        name, schedule = watched.name, watched.declared
        # NOTE: slots before the deployment existed in Prefect had nobody to run them; a
        # redeploy replaces the schedules (new ids, new creation times) but keeps the
        # deployment's, so the nights before a redeploy are still checked.
        since = state.watching_since.setdefault((name, schedule.slug), clock)
        if watched.deployment is not None and watched.deployment.created is not None:
            since = min(since, watched.deployment.created)
        squatted: dict[datetime, FlowRun] = {}
        if watched.deployment is not None and watched.schedule is not None:
            deployment, api_schedule = watched.deployment, watched.schedule
            slots = schedule_slots(schedule, earliest, clock + SCHEDULER_HORIZON)
            keys = {scheduler_key(deployment.id, api_schedule.id, slot): slot for slot in slots}
            for run in await _runs_with_keys(client, deployment.flow_id, list(keys)):
                slot = keys.get(run.idempotency_key or "")
                if slot is None or _scheduled_by(
                    run, deployment.id, schedule.slug, {str(api_schedule.id)}
                ):
                    continue
                if not _in_scope(run, config):
                    continue
                squatted[_utc(slot)] = run
                removed = _never_ran(run)
                if removed:
                    await _delete_run(client, run.id)
                    deleted.append(run.id)
                findings.append(_squatter_finding(watched, slot, run, removed=removed, clock=clock))
        past = [
            slot
            for slot in schedule_slots(schedule, max(earliest, since), clock - config.slot_grace)
            if slot >= since
        ]
        if past:
            findings += await _missed_slots(client, watched, past, squatted)
    return deleted, findings


async def _delete_run(client: PrefectClient, run_id: uuid.UUID) -> None:
    # NOTE: gone already is as good (another worker's housekeeper, or its owner, was first).
    with contextlib.suppress(ObjectNotFound):
        await client.delete_flow_run(run_id)


def _squatter_finding(
    watched: _Watched, slot: datetime, run: FlowRun, *, removed: bool, clock: datetime
) -> Finding:
    night = f"{watched.name} {_slot_text(slot, watched.declared)}"
    what = (
        f"{night}: its scheduler idempotency key was taken by a run created through the API "
        f"(flow run {run.id}, {run.state_name or 'no state'})"
    )
    if removed and slot > clock:
        outcome = "; that run was deleted, so Prefect's scheduler can create the real one."
    elif removed:
        outcome = "; that run was deleted, but the slot has passed: that night did not run."
    else:
        outcome = "; that run had already started: that night did not run as scheduled."
    return Finding(
        event=HOUSEKEEPING_EVENTS["slot_squatted"],
        event_id=_event_id(
            "slot-squatted", watched.name, watched.declared.slug, slot.isoformat(), run.id
        ),
        subject=f"tenantflow: {night} was squatted by flow run {run.id}",
        message=what + outcome,
        resource=_deployment_resource(watched.name, watched.deployment),
        related=(_flow_run_related(run.id),),
        details={
            "deployment": watched.name,
            "schedule": watched.declared.slug,
            "slot": slot.isoformat(),
            "flow_run_id": str(run.id),
            "deleted": removed,
        },
    )


async def _missed_slots(
    client: PrefectClient,
    watched: _Watched,
    slots: Sequence[datetime],
    squatted: Mapping[datetime, FlowRun],
) -> list[Finding]:
    """Past slots without a scheduled run of their own that ran."""
    name, schedule, deployment = watched.name, watched.declared, watched.deployment
    runs: dict[datetime, FlowRun] = {}
    if deployment is not None:
        schedule_ids = {str(watched.schedule.id)} if watched.schedule else set()
        margin = timedelta(hours=1)
        for scheduled in await _scheduled_runs(
            client, deployment.id, slots[0] - margin, slots[-1] + margin
        ):
            key_slot = _key_slot(scheduled)
            if key_slot is not None and _scheduled_by(
                scheduled, deployment.id, schedule.slug, schedule_ids
            ):
                runs.setdefault(key_slot, scheduled)
    findings: list[Finding] = []
    for slot in slots:
        run = runs.get(_utc(slot))
        if run is not None and not _never_ran(run):
            continue
        night = f"{name}'s {_slot_text(slot, schedule)} slot"
        if run is not None:
            message = (
                f"{night} did not run: its scheduled flow run {run.id} is "
                f"{run.state_name or 'without a state'} and never started"
            )
            subject = f"tenantflow: {night} did not run"
        else:
            squatter = squatted.get(_utc(slot))
            message = f"no scheduled run for {night}{_why_missing(watched, squatter)}"
            subject = f"tenantflow: no scheduled run for {night}"
        findings.append(
            Finding(
                event=HOUSEKEEPING_EVENTS["slot_missed"],
                event_id=_event_id("slot-missed", name, schedule.slug, slot.isoformat()),
                subject=subject,
                message=message,
                resource=_deployment_resource(name, deployment),
                related=(_flow_run_related(run.id),) if run is not None else (),
                details={
                    "deployment": name,
                    "schedule": schedule.slug,
                    "slot": slot.isoformat(),
                    "flow_run_id": str(run.id) if run is not None else None,
                },
            )
        )
    return findings


def _why_missing(watched: _Watched, squatter: FlowRun | None) -> str:
    """What the API shows that explains a missing run (an API holder's doing, often)."""
    slug = watched.declared.slug
    if watched.deployment is None:
        return f" (Prefect has no deployment named {watched.name})"
    if watched.schedule is None:
        return f" (the deployment has no schedule {slug} in Prefect)"
    if squatter is not None:
        return f" (its scheduler idempotency key was taken by flow run {squatter.id})"
    if watched.deployment.paused:
        return " (the deployment is paused in Prefect)"
    if not watched.schedule.active:
        return f" (its schedule {slug} is paused in Prefect)"
    return ""


# --------------------------------------------------------------------------- limits


async def _watch_limits(
    client: PrefectClient,
    deployment_ids: Sequence[uuid.UUID],
    config: HousekeepingConfig,
    state: HousekeepingState,
    clock: datetime,
) -> list[Finding]:
    """Limits with more slots taken than the project's running runs can hold, for longer
    than `limit_stuck_after`.

    NOTE: Prefect 3.9 keeps a lease per acquisition, but its API shows the leases of tag
    limits only; for a global limit the slots the running runs of the declared
    deployments can hold (`flow_slots` each) is the upper bound of what leases can hold.
    A run marked Running through the API raises that bound, so it can hide a stuck limit,
    never invent one.
    """
    findings: list[Finding] = []
    running: int | None = None
    for name in config.limits:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            continue
        if not limit.active or limit.slot_decay_per_second or limit.active_slots <= 0:
            state.stuck_since.pop(limit.id, None)
            continue
        if running is None:
            running = await _running_runs(client, deployment_ids)
        holdable = running * config.flow_slots
        if limit.active_slots <= holdable:
            state.stuck_since.pop(limit.id, None)
            continue
        since = state.stuck_since.setdefault(limit.id, clock)
        if clock - since < config.limit_stuck_after:
            continue
        unheld = limit.active_slots - holdable
        findings.append(
            Finding(
                event=HOUSEKEEPING_EVENTS["limit_stuck"],
                event_id=_event_id("limit-stuck", limit.id, since.isoformat()),
                subject=f"tenantflow: concurrency limit {name} is held by nobody",
                message=(
                    f"Concurrency limit {name} has {limit.active_slots} of {limit.limit} slots "
                    f"taken, but the {running} running flow runs of the project can hold at "
                    f"most {holdable}: {unheld} slots have been taken with no holder since "
                    f"{since:%Y-%m-%d %H:%M} UTC, and runs that need slots wait for them. "
                    "Someone with the Prefect API auth string may have set its active slots. "
                    f"Check `prefect global-concurrency-limit inspect {name}`; with no run "
                    f"going, `prefect global-concurrency-limit update {name} --active-slots 0`."
                ),
                resource={
                    "prefect.resource.id": f"prefect.concurrency-limit.{limit.id}",
                    "prefect.resource.name": name,
                },
                details={
                    "limit": name,
                    "limit_size": limit.limit,
                    "active_slots": limit.active_slots,
                    "running_flow_runs": running,
                    "leased_slots_at_most": holdable,
                    "unheld_slots": unheld,
                    "stuck_since": since.isoformat(),
                },
            )
        )
    return findings


async def _running_runs(client: PrefectClient, deployment_ids: Sequence[uuid.UUID]) -> int:
    if not deployment_ids:
        return 0
    return await client.count_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=list(deployment_ids)),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(_HOLDING_STATES))),
        )
    )


# --------------------------------------------------------------------------- events


async def _emit(
    client: PrefectClient,
    findings: Collection[Finding],
    state: HousekeepingState,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> list[uuid.UUID]:
    """Send each finding not sent before as an event, and log it as a warning; the ids sent.

    NOTE: an event's id is the finding's (one per night, squatter or incident), and the
    server is asked first, so a restarted housekeeper or another worker's does not
    report a night again.
    """
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.events.filters import EventFilter, EventIDFilter, EventOccurredFilter

    fresh = [finding for finding in findings if finding.event_id not in state.emitted]
    if not fresh:
        return []
    real_now = datetime.now(UTC)
    known = await client.read_events(
        filter=EventFilter(
            id=EventIDFilter(id=[finding.event_id for finding in fresh]),
            occurred=EventOccurredFilter(since=real_now - _EVENT_MEMORY, until=real_now + _OVERLAP),
        ),
        limit=len(fresh),
    )
    state.emitted |= {event.id for event in known.events}
    fresh = [finding for finding in fresh if finding.event_id not in state.emitted]
    sent: list[uuid.UUID] = []
    if not fresh:
        return sent
    async with get_events_client() as events:
        for finding in fresh:
            log.warning("%s", finding.message)
            await events.emit(
                Event(
                    id=finding.event_id,
                    occurred=datetime.now(UTC),
                    event=finding.event,
                    resource=dict(finding.resource),
                    related=[dict(related) for related in finding.related],
                    payload={
                        "subject": finding.subject,
                        "message": finding.message,
                        **finding.details,
                    },
                )
            )
            state.emitted.add(finding.event_id)
            sent.append(finding.event_id)
    return sent
