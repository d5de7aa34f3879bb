"""Client reports: one client's events over a period, read under row-level security."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import text

from tenantflow.db import set_local
from tenantflow.errors import TenantflowError
from tenantflow.rollup import day_bounds
from tenantflow.settings import get_settings
from tenantflow.tenancy import TenantContext, tenant_session

__all__ = [
    "ClientReport",
    "DailyTotals",
    "ReportFailed",
    "ReportPeriod",
    "build_client_report",
    "markdown_text",
    "render_markdown",
]


#: Reports cover days from here to tomorrow (UTC): no event is older, and a day far in
#: the future would only overflow date arithmetic.
EARLIEST_DAY = date(2000, 1, 1)


class ReportFailed(TenantflowError, RuntimeError):
    """The report could not be built (the reason is safe to show)."""


class ReportPeriod(BaseModel):
    """A report's period: whole UTC days, `start` to `end` inclusive."""

    model_config = ConfigDict(frozen=True)

    start: date = Field(description="First day (UTC), inclusive.")
    end: date = Field(description="Last day (UTC), inclusive.")

    @model_validator(mode="after")
    def _bounded(self) -> ReportPeriod:
        latest = datetime.now(UTC).date() + timedelta(days=1)
        if self.start < EARLIEST_DAY:
            raise ValueError(f"period_start {self.start} is before {EARLIEST_DAY}")
        if self.end > latest:
            raise ValueError(f"period_end {self.end} is after {latest} (tomorrow, UTC)")
        if self.end < self.start:
            raise ValueError(f"period_end {self.end} is before period_start {self.start}")
        days = (self.end - self.start).days + 1
        limit = get_settings().report_max_days
        if days > limit:
            raise ValueError(f"the period covers {days} days; at most {limit} are allowed")
        return self

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1


@dataclass(frozen=True)
class DailyTotals:
    day: date
    events: int
    revenue: Decimal


@dataclass(frozen=True)
class ClientReport:
    report_id: UUID
    client_id: UUID
    client_name: str
    period: ReportPeriod
    events: int
    revenue: Decimal
    by_kind: dict[str, int] = field(default_factory=dict)
    daily: list[DailyTotals] = field(default_factory=list)


# NOTE: no `WHERE client_id` is needed for safety — row-level security already limits
# the rows to the user's clients — but it is there for the index and the meaning.
_DAILY = text(
    """
    SELECT CAST(date_trunc('day', occurred_at AT TIME ZONE 'UTC') AS date) AS day,
           count(*) AS events, coalesce(sum(amount), 0) AS revenue
    FROM public.client_events
    WHERE client_id = CAST(:client_id AS uuid) AND occurred_at >= :start AND occurred_at < :end
    GROUP BY 1 ORDER BY 1
    """
)
_BY_KIND = text(
    """
    SELECT kind, count(*) FROM public.client_events
    WHERE client_id = CAST(:client_id AS uuid) AND occurred_at >= :start AND occurred_at < :end
    GROUP BY kind ORDER BY kind
    """
)
_STORE = text(
    """
    INSERT INTO public.client_reports
        (client_id, requested_by, period_start, period_end, totals, flow_run_id)
    VALUES (CAST(:client_id AS uuid), CAST(:requested_by AS uuid), :start, :end,
            CAST(:totals AS jsonb), CAST(:flow_run_id AS uuid))
    RETURNING id
    """
)


async def build_client_report(ctx: TenantContext, period: ReportPeriod) -> ClientReport:
    """Read the client's events as the user (RLS applies) and store the report, atomically."""
    start, _ = day_bounds(period.start)
    _, end = day_bounds(period.end)
    window = {"client_id": ctx.client_id, "start": start, "end": end}
    async with tenant_session(ctx) as session:
        found = {row.day: row for row in await session.execute(_DAILY, window)}
        by_kind: dict[str, int] = {
            row[0]: row[1] for row in await session.execute(_BY_KIND, window)
        }
        daily = [
            DailyTotals(day, found[day].events, found[day].revenue)
            if day in found
            else DailyTotals(day, 0, Decimal(0))
            for day in (period.start + timedelta(days=n) for n in range(period.days))
        ]
        events = sum(d.events for d in daily)
        revenue = sum((d.revenue for d in daily), Decimal(0))
        totals = {"events": events, "revenue": str(revenue), "by_kind": by_kind}
        # NOTE: the worker stores the report, not the user: members may not write
        # client_reports (through Supabase's Data API they could invent totals). The
        # switch holds for the rest of this transaction only.
        await set_local(session, {"role": "service_role"})
        report_id = (
            await session.execute(
                _STORE,
                {
                    "client_id": ctx.client_id,
                    "requested_by": ctx.actor.user_id,
                    "start": period.start,
                    "end": period.end,
                    "totals": json.dumps(totals),
                    "flow_run_id": ctx.flow_run_id,
                },
            )
        ).scalar_one()
    return ClientReport(
        report_id, ctx.client_id, ctx.client_name, period, events, revenue, by_kind, daily
    )


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def markdown_text(value: str) -> str:
    """Escape client-supplied text (names, kinds) so it renders as text, never as markup."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", value.replace("\n", " "))


def render_markdown(report: ClientReport) -> str:
    """The report for the Prefect UI: period, totals, a daily table. No secrets in it."""
    lines = [
        f"# Report for {markdown_text(report.client_name)}",
        "",
        f"- Client: `{report.client_id}`",
        f"- Period: {report.period.start} to {report.period.end} (UTC, {report.period.days} days)",
        f"- Events: **{report.events}**",
        f"- Revenue: **{report.revenue:.2f}**",
        f"- Report id: `{report.report_id}`",
        "",
    ]
    if report.by_kind:
        lines += ["| kind | events |", "|---|---:|"]
        lines += [f"| {markdown_text(kind)} | {count} |" for kind, count in report.by_kind.items()]
        lines.append("")
    lines += ["| day | events | revenue |", "|---|---:|---:|"]
    lines += [f"| {d.day} | {d.events} | {d.revenue:.2f} |" for d in report.daily]
    return "\n".join(lines) + "\n"
