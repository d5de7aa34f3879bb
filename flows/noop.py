"""`noop`: a flow that does nothing; it exists to measure the worker's floor.

`make bench` times a `client-report` run through its deployment and the worker against a
run of this flow through the same pool and worker, so the difference is what the report
itself costs (the guard, the database, the artifacts), not the worker's own overhead
(picking the run up, starting a process, loading Prefect). It takes no parameters and
touches no client data, no database and no token.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow
from prefect.client.schemas.objects import FlowRun, State


def nothing_to_release(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """on_cancellation and on_crashed hook: noop holds nothing to release.

    The worker runs these hooks itself, from the flow the project declares (never from the
    deployment as the API stores it); Prefect logs each one it runs in the run's logs.
    """


@flow(
    name="noop",
    retries=0,
    persist_result=False,
    log_prints=False,
    timeout_seconds=60,
    on_cancellation=[nothing_to_release],
    on_crashed=[nothing_to_release],
)
async def noop() -> None:
    """Do nothing: the floor of a run through the deployment and the worker (`make bench`)."""
