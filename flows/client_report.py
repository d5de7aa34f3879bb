"""`client-report`: one client's events over a period, read as the requesting user.

User mode: the run acts for the user whose sealed access token it carries, who needs an
accepted membership in the (active) client; row-level security holds the same rule
inside Postgres. Steps: check the period, authorize, take a database slot, read and
store the report in one transaction, publish markdown and table artifacts.
"""

from __future__ import annotations

from datetime import date
from functools import partial
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

from tenantflow.batches import run_for_clients
from tenantflow.budget import database_slots
from tenantflow.reports import ReportFailed, ReportPeriod, build_client_report, render_markdown
from tenantflow.tenancy import SealedAccessToken, authorize_run, tenant_flow


@tenant_flow(name="client-report", timeout_seconds=900)
async def client_report(
    client_id: UUID,
    period_start: date,
    period_end: date,
    access_token: SealedAccessToken,
) -> dict[str, str | int]:
    """A report of one client over a period, read as the user whose token is given.

    Args:
        client_id: The client to report on (its id in `clients`).
        period_start: First day of the period, UTC, inclusive.
        period_end: Last day of the period, UTC, inclusive (at most 366 days in all,
            not after tomorrow).
        access_token: The sealed access token of the user the report is for, a member of
            the client, for exactly this run: `tenantflow seal --flow client-report
            --client CLIENT_ID --param period_start=DAY --param period_end=DAY` turns the
            user's Supabase access token into one. A plain token is refused.
    """
    logger = get_run_logger()
    period = ReportPeriod(start=period_start, end=period_end)
    [ctx] = await authorize_run(
        action="client-report",
        mode="user",
        access_token=access_token,
        client_ids=[client_id],
    )
    async with database_slots(1):
        [outcome] = await run_for_clients(
            [ctx], partial(build_client_report, period=period), name="client-report"
        )
    if outcome.value is None:
        raise ReportFailed(f"the report of {ctx.label} failed: {outcome.error}")
    report = outcome.value
    logger.info("report %s: %d events for %s", report.report_id, report.events, ctx.label)
    await acreate_markdown_artifact(
        render_markdown(report),
        key=f"client-report-{client_id}",
        description=f"Report for {ctx.client_id}, {period.start} to {period.end}",
    )
    await acreate_table_artifact(
        [
            {"day": str(d.day), "events": d.events, "revenue": f"{d.revenue:.2f}"}
            for d in report.daily
        ],
        key=f"client-report-daily-{client_id}",
        description=f"Daily totals for {ctx.client_id}",
    )
    return {"report_id": str(report.report_id), "events": report.events}
