"""The Prefect set-up of the local stack: its settings, work pool, limit and deployments.

* `stack_settings(config)` — the worker's settings as the stack's worker sees them.
* `bootstrap(config)` — the work pool and the `tenantflow-db` limit on the stack's server.
* `deploy(config)` — every deployment of `prefect.yaml` onto the stack's server.
"""

from __future__ import annotations

from tenantflow.automations import Alerts
from tenantflow.deployments import BootstrapError, BootstrapResult, DeployResult
from tenantflow.deployments import bootstrap as bootstrap_prefect
from tenantflow.deployments import deploy as deploy_prefect
from tenantflow.project import DeployError
from tenantflow.settings import Settings, SettingsError, load_settings
from tenantflow_dev.config import StackConfig
from tenantflow_dev.errors import StackError

__all__ = ["bootstrap", "deploy", "stack_settings"]


def stack_settings(config: StackConfig) -> Settings:
    """The worker's settings as the stack's worker sees them (the stack's URLs and keys)."""
    env = config.environment()
    try:
        return load_settings(
            database_url=env["DATABASE_URL"],
            migration_database_url=env["MIGRATION_DATABASE_URL"],
            supabase_url=env["SUPABASE_URL"],
            supabase_anon_key=env["SUPABASE_ANON_KEY"],
        )
    except SettingsError as error:
        raise StackError(str(error)) from None


def bootstrap(config: StackConfig) -> BootstrapResult:
    """Create or update the process work pool and the database limit on the stack's server.

    The limit's size is DB_CONCURRENCY_SLOTS, which must fit in the transaction pooler's
    pool: more slots than server connections would only queue inside PgBouncer.
    """
    settings = stack_settings(config)
    if settings.db_concurrency_slots > config.pooler_pool_size:
        raise StackError(
            f"DB_CONCURRENCY_SLOTS={settings.db_concurrency_slots} exceeds the transaction "
            f"pooler's pool size {config.pooler_pool_size}"
        )
    try:
        return bootstrap_prefect(
            concurrency_limit=settings.db_concurrency_limit,
            concurrency_slots=settings.db_concurrency_slots,
            flow_slots=settings.db_flow_slots,
            project_dir=config.project_dir,
            api_url=config.prefect_api_url,
            auth_string=config.secrets.prefect_auth_string,
            alerts=Alerts.from_settings(settings),
        )
    except BootstrapError as error:
        raise StackError(f"Prefect bootstrap failed: {error}") from None


def deploy(config: StackConfig) -> DeployResult:
    """`prefect --no-prompt deploy --all` of the project onto the stack's server."""
    try:
        return deploy_prefect(project_dir=config.project_dir, env=config.environment())
    except DeployError as error:
        raise StackError(str(error)) from None
