"""A flow-run process of the tenantflow worker: `python -m tenantflow.flow_run ENTRYPOINT`.

The worker starts every flow run with this command and the absolute entrypoint that its own
`prefect.yaml` declares for the run's deployment. It sets the tripwire
(`tenantflow.tripwire`) first, so nothing in the process can load a flow or run steps from
the deployment as the API stores it, then hands over to Prefect's runtime-entrypoint
engine, which loads the flow from `ENTRYPOINT` only (never from the API) and runs the flow
run named by `PREFECT__FLOW_RUN_ID`, as `python -m prefect.engine` would.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tenantflow.tripwire import install_tripwire

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the flow run of `PREFECT__FLOW_RUN_ID` from the entrypoint in `argv`; exit code."""
    install_tripwire()
    from prefect import flow_engine

    # NOTE: `prefect.flow_engine._main([entrypoint])` is what Prefect's own workspace
    # bootstrap calls for a flow run with a known entrypoint (`python -m prefect.flow_engine
    # ENTRYPOINT`); unlike `prefect.engine` it has no fallback to the deployment's storage.
    return int(flow_engine._main(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    raise SystemExit(main())
