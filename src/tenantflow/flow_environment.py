"""What a flow-run process of the tenantflow worker may hold in its environment.

The worker gives each flow run an allow-listed environment instead of its own whole
`os.environ` (`flow_run_environment`): what any process needs to run on the machine,
Prefect's client settings and per-run variables, and tenantflow's settings, and of
these the schema owner's login (`MIGRATION_DATABASE_URL`) only to runs that migrate.
The local stack starts its workers with the same allow-list. No Prefect import here, so
the stack's command line stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from tenantflow.project import PROJECT_DIR_ENV
from tenantflow.settings import Settings

__all__ = ["BASIC_ENVIRONMENT", "MIGRATION_ENV", "flow_run_environment"]

#: The schema owner's login: only in runs of deployments declared for `tenantflow-migrate`.
MIGRATION_ENV = "MIGRATION_DATABASE_URL"

#: What any process needs of the worker's environment to run on this machine: paths, user,
#: locale, time zone, and the TLS trust and proxies that reach Supabase and Prefect.
BASIC_ENVIRONMENT = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "XDG_CACHE_HOME",
        "VIRTUAL_ENV",
        "PYTHONUNBUFFERED",
        "PYTHONIOENCODING",
        "PYTHONDONTWRITEBYTECODE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        PROJECT_DIR_ENV,
    }
)
_BASIC_PREFIXES = ("LC_",)
#: Prefect settings of the server (its database login among them), never a client's.
_SERVER_ONLY_PREFIXES = ("PREFECT_SERVER_", "PREFECT_API_DATABASE_")


def _tenantflow_settings() -> frozenset[str]:
    """The environment names of tenantflow's settings (lower case; they are case-blind)."""
    return frozenset(Settings.model_fields)


def flow_run_environment(
    prefect: Mapping[str, str | None],
    worker: Mapping[str, str] | None = None,
    *,
    migration: bool = False,
) -> dict[str, str]:
    """A flow-run process's whole environment: what it needs, nothing else.

    Args:
        prefect: what Prefect prepared for the run: its client settings (`PREFECT_*`) and
            per-run variables (`PREFECT__FLOW_RUN_ID`, attribution).
        worker: the worker's environment (default `os.environ`), of which the run gets
            the basics, Prefect's client settings and tenantflow's settings.
        migration: whether the run may hold `MIGRATION_DATABASE_URL` (a deployment
            declared for `tenantflow-migrate`).
    """
    worker = os.environ if worker is None else worker
    settings = _tenantflow_settings()
    if not migration:
        settings -= {MIGRATION_ENV.lower()}
    env: dict[str, str] = {}
    for key, value in worker.items():
        if key.startswith("PREFECT__"):
            continue  # per-run variables: only those Prefect prepared for this run, below
        if (
            key in BASIC_ENVIRONMENT
            or key.startswith(_BASIC_PREFIXES)
            or key.lower() in settings
            or (key.startswith("PREFECT_") and not key.startswith(_SERVER_ONLY_PREFIXES))
        ):
            env[key] = value
    for key, prepared in prefect.items():
        if (
            prepared is not None
            and key.startswith("PREFECT_")
            and not key.startswith(_SERVER_ONLY_PREFIXES)
        ):
            env[key] = prepared
    return env
