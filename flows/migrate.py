"""The `migrate` flow: bring the schema to a revision through the session pooler.

Steps: migrate (or render the SQL, for a dry run), report before/after in the run log
and a markdown artifact. The rules (session pooler only, one migration at a time
under an advisory lock, all or nothing, downgrade only to an explicit target) live in
`tenantflow.migrate`. Failures raise, so the run ends Failed with the reason; no
retries: a refused URL or revision stays refused, and a run that lost the lock race
should be started again on purpose, not automatically.

Who may start it is Prefect's business (DESIGN.md §2): it touches schema, not client
data, with the migration credentials of the worker's environment.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact

from tenantflow.migrate import MigrationResult, run_migration


@flow(name="migrate", retries=0, persist_result=False, log_prints=False)
async def migrate(
    revision: str = "head",
    dry_run: bool = False,
    downgrade_to: str | None = None,
) -> MigrationResult:
    """Upgrade to `revision` (default: head), or downgrade to an explicit `downgrade_to`.

    Args:
        revision: `head` or a revision id to upgrade to.
        dry_run: only render the SQL a real run would execute (into the artifact).
        downgrade_to: a revision id, or `base`, to downgrade to; never relative.
    """
    logger = get_run_logger()
    result = await run_migration(
        revision=revision, downgrade_to=downgrade_to, dry_run=dry_run, logger=logger
    )
    await acreate_markdown_artifact(
        markdown=result.to_markdown(),
        key="migration-dry-run" if dry_run else "migration",
        description=result.summary(),
    )
    return result
