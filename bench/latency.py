"""The latency an operator sees: `client-report` through its deployment and the worker,
against the `noop` flow on the same pool and worker."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta

from bench.stackapi import TimedRun, run_deployment_timed
from bench.table import Row, ratio, say
from tenantflow_dev.config import StackConfig
from tenantflow_dev.demo import ACME, DEMO_MEMBER, sealed_token

RUNS = 3


async def _report(config: StackConfig) -> TimedRun:
    today = datetime.now(UTC).date()
    period = {
        "period_start": (today - timedelta(days=7)).isoformat(),
        "period_end": today.isoformat(),
    }
    token = await sealed_token(
        config, DEMO_MEMBER, flow="client-report", client_ids=[ACME.id], parameters=period
    )
    return await run_deployment_timed(
        "client-report/client-report",
        {"client_id": str(ACME.id), **period, "access_token": token},
        poll=0.25,
    )


async def latency_rows(config: StackConfig) -> list[Row]:
    say(f"\n## created -> Completed through the deployment and the worker ({RUNS} runs each)")
    noops: list[TimedRun] = []
    reports: list[TimedRun] = []
    for _ in range(RUNS):
        noops.append(await run_deployment_timed("noop/noop", {}, poll=0.25))
        reports.append(await _report(config))
    for run in noops + reports:
        if not run.ok:
            raise RuntimeError(f"flow run {run.id} ended {run.state}: {run.message}")

    def med(runs: list[TimedRun], what: str) -> float:
        return float(statistics.median(getattr(run, what) for run in runs))

    rows = []
    for what, label, target in (
        ("created_to_completed", "created->Completed", "<= 1.2x"),
        ("created_to_started", "created->Running (pick-up, process start)", "-"),
        ("run_seconds", "Running->Completed (the flow itself)", "-"),
    ):
        report, noop = med(reports, what), med(noops, what)
        say(f"  {label:<44} client-report {report:6.2f}s   noop {noop:6.2f}s")
        rows.append(
            Row(
                f"client-report, {label} (s, median)",
                f"{report:.2f}",
                f"{noop:.2f} (noop)",
                ratio(report, noop),
                target,
                report <= 1.2 * noop if target != "-" else None,
            )
        )
    return rows
