"""Bootstrap a Prefect installation for tenantflow: work pools and the `tenantflow-db` limit.

Thin entry over `tenantflow deploy --bootstrap-only` (logic: `tenantflow.deployments`).
Idempotent; reads PREFECT_API_URL and the DB_CONCURRENCY_* settings from the environment or
the project's `.env`. Examples:

    python deployments/bootstrap.py                        # tenantflow-process
    python deployments/bootstrap.py --pool-type kubernetes # tenantflow-kubernetes
"""

from __future__ import annotations

import sys

from tenantflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["deploy", "--bootstrap-only", *sys.argv[1:]]))
