"""The `migrate` flow: bring the schema up to a revision through the session pooler.

Operator mode: every run needs a tenantflow operator's sealed access token, and the
decision is audited like any other. Steps: authorize, migrate (or render the SQL, for a
dry run), report before/after in the run log and a markdown artifact. The rules
(session pooler only, one migration at a time under an advisory lock, all or nothing)
live in `tenantflow.migrate`. This flow only upgrades: a downgrade destroys data and is
done from the command line only (`tenantflow migrate --downgrade-to REV --yes`).
Failures raise, so the run ends Failed with the reason; no retries.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import acreate_markdown_artifact

from tenantflow.migrate import MigrationResult, run_migration
from tenantflow.tenancy import SealedAccessToken, authorize_run, tenant_flow


@tenant_flow(name="migrate", log_prints=False)
async def migrate(
    access_token: SealedAccessToken,
    revision: str = "head",
    dry_run: bool = False,
) -> MigrationResult:
    """Upgrade the schema to `revision` (default: head), or show the SQL (`dry_run`).

    Args:
        access_token: A tenantflow operator's sealed access token for exactly this run
            (`tenantflow seal --flow migrate`, plus `--param revision=REV` or `--param
            dry_run=true` when those are not left at their defaults).
        revision: `head` or a revision id to upgrade to.
        dry_run: only render the SQL a real run would execute (into the artifact).
    """
    logger = get_run_logger()
    await authorize_run(
        action="migrate", mode="operator", access_token=access_token, client_ids=None
    )
    result = await run_migration(revision=revision, dry_run=dry_run, logger=logger)
    await acreate_markdown_artifact(
        markdown=result.to_markdown(),
        key="migration-dry-run" if dry_run else "migration",
        description=result.summary(),
    )
    return result
