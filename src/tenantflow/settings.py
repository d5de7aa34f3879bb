"""Settings of the tenantflow worker: the one place configuration is read.

Values come from the environment and from a `.env` file in the working directory
(the local stack writes one). Every secret is a `SecretStr`; every rule about the
database URLs is checked here, before any connection is attempted, and no error
message ever repeats a password (`hide_input_in_errors`, and messages built from
the parsed parts of a URL, never from the URL itself).

Every setting is described where it is declared; which URL goes where: docs/connections.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from tenantflow.errors import TenantflowError

# NOTE: `sealing` imports only joserfc and pydantic, so settings stay light to import.
from tenantflow.sealing import SealError, key_ids

__all__ = [
    "FaultSettings",
    "OperatorSettings",
    "SealSettings",
    "Settings",
    "SettingsError",
    "endpoint_of",
    "get_settings",
    "load_fault_settings",
    "load_operator_settings",
    "load_seal_settings",
    "migration_endpoint_refusal",
    "port_of",
    "redacted_url",
]

SUPABASE_POOLER_SUFFIX = ".pooler.supabase.com"
TRANSACTION_POOLER_PORT = 6543
SESSION_POOLER_PORT = 5432
DEFAULT_POSTGRES_PORT = 5432
#: Supavisor logs a role in as `<role>.<project_ref>`.
_POOLER_USER = re.compile(r"^(?P<role>[a-z_][a-z0-9_]*)\.[a-z0-9]{6,40}$")
#: Logins that own the tables or bypass row-level security: never the workers' login.
_OWNER_ROLES = frozenset({"postgres", "supabase_admin", "service_role", "authenticator"})
_ASYNC_DRIVER = "postgresql+asyncpg"
_ACCEPTED_SCHEMES = {"postgres", "postgresql", _ASYNC_DRIVER}


class SettingsError(TenantflowError, ValueError):
    """Configuration is invalid. The message names the fields and rules, never a secret."""


def redacted_url(url: SecretStr | str | URL) -> str:
    """Render a database URL for logs and messages, with the password masked."""
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    try:
        parsed = raw if isinstance(raw, URL) else make_url(raw)
    except ArgumentError:
        return "<unparseable URL>"
    return parsed.render_as_string(hide_password=True)


def _parse_postgres_url(value: SecretStr, field: str) -> URL:
    """Parse and normalise a PostgreSQL URL to the asyncpg driver.

    NOTE: SQLAlchemy's own parse error repeats the whole URL (password included),
    so it is replaced by a message of our own.
    """
    try:
        url = make_url(value.get_secret_value().strip())
    except ArgumentError:
        raise ValueError(
            f"{field} is not a database URL; expected postgresql://USER:PASSWORD@HOST:PORT/DB"
        ) from None
    if url.drivername not in _ACCEPTED_SCHEMES:
        raise ValueError(
            f"{field} must be a PostgreSQL URL (postgresql:// or postgresql+asyncpg://), "
            f"not {url.drivername}://"
        )
    if not url.host:
        raise ValueError(f"{field} must name a host")
    if not url.username:
        raise ValueError(f"{field} must name a user")
    if not url.database:
        raise ValueError(f"{field} must name a database (Supabase: /postgres)")
    query = dict(url.query)
    # NOTE: asyncpg takes `ssl`, not libpq's `sslmode`; Supabase's dashboard strings may carry it.
    if "sslmode" in query:
        query.setdefault("ssl", query.pop("sslmode"))
    if url.host.endswith(".supabase.com") or url.host.endswith(".supabase.co"):
        query.setdefault("ssl", "require")
    return url.set(drivername=_ASYNC_DRIVER, query=query)


def port_of(url: URL) -> int:
    """The port a PostgreSQL URL connects to (libpq's default when it names none)."""
    return url.port or DEFAULT_POSTGRES_PORT


def endpoint_of(url: URL) -> str:
    """`host:port` of a PostgreSQL URL, for messages (no user, no password)."""
    return f"{url.host}:{port_of(url)}"


def migration_endpoint_refusal(migration_url: URL, database_url: URL) -> str | None:
    """Why migrating through `migration_url` is refused, or None when it is allowed.

    The one rule for the migration endpoint, applied by `Settings` on load and again by
    `tenantflow.migrate` before it connects (settings built with `model_copy` skip
    validation). Migrations hold a session-level advisory lock and run long DDL
    transactions, so they need the session pooler (or a direct connection):

    * never port 6543, the transaction pooler's port on Supabase;
    * on a Supabase pooler host, only port 5432, the session pooler;
    * never the host and port of `DATABASE_URL`, which workers use and which is the
      transaction pooler by definition (whatever its port).
    """
    port = port_of(migration_url)
    if port == TRANSACTION_POOLER_PORT:
        return (
            f"port {TRANSACTION_POOLER_PORT} is the transaction pooler; migrations must use "
            f"the session pooler (port {SESSION_POOLER_PORT} on Supabase)"
        )
    if _is_supabase_pooler(migration_url) and port != SESSION_POOLER_PORT:
        return (
            f"migrations must use the Supabase session pooler, port {SESSION_POOLER_PORT}, "
            f"not port {port}"
        )
    if (migration_url.host, port) == (database_url.host, port_of(database_url)):
        return (
            "it points at the same host and port as DATABASE_URL, the workers' transaction "
            "pooler; migrations must use the session pooler"
        )
    return None


def _is_supabase_pooler(url: URL) -> bool:
    return bool(url.host and url.host.endswith(SUPABASE_POOLER_SUFFIX))


def _check_pooler_user(url: URL, field: str) -> None:
    if not _POOLER_USER.match(url.username or ""):
        raise ValueError(
            f"{field}: Supabase pooler connections must log in as <role>.<project_ref> "
            "(e.g. postgres.<project_ref> as in the dashboard), not a bare user name"
        )


def _login_role(url: URL) -> str:
    """The database role a URL logs in as (Supavisor's `<role>.<ref>` names the role)."""
    user = url.username or ""
    match = _POOLER_USER.match(user) if _is_supabase_pooler(url) else None
    return match["role"] if match else user


def _database_url(value: SecretStr) -> SecretStr:
    url = _parse_postgres_url(value, "DATABASE_URL")
    if _is_supabase_pooler(url):
        if port_of(url) != TRANSACTION_POOLER_PORT:
            raise ValueError(
                f"DATABASE_URL: workers must use the Supabase transaction pooler, port "
                f"{TRANSACTION_POOLER_PORT}, not port {port_of(url)}"
            )
        _check_pooler_user(url, "DATABASE_URL")
    if _login_role(url) in _OWNER_ROLES:
        raise ValueError(
            f"DATABASE_URL logs in as {_login_role(url)}, which owns the tables or bypasses "
            "row-level security; workers log in as their own role (tenantflow_worker, see "
            "docs/operations.md), and only migrations use the owner"
        )
    return SecretStr(url.render_as_string(hide_password=False))


def _migration_database_url(value: SecretStr) -> SecretStr:
    url = _parse_postgres_url(value, "MIGRATION_DATABASE_URL")
    # NOTE: which endpoint it may be is `migration_endpoint_refusal`, checked once both
    # URLs are known (`Settings._migration_endpoint`).
    if _is_supabase_pooler(url):
        _check_pooler_user(url, "MIGRATION_DATABASE_URL")
    return SecretStr(url.render_as_string(hide_password=False))


def _supabase_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("SUPABASE_URL must be an http(s) URL such as https://<ref>.supabase.co")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("SUPABASE_URL must not carry credentials, a query or a fragment")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("SUPABASE_URL must use https unless it points at this machine")
    return value.strip().rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _blank_is_unset(value: Any) -> Any:
    """An empty `SEAL_PRIVATE_KEYS=` line (as in an env template) means: not set."""
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    return None if isinstance(raw, str) and not raw.strip() else value


def _seal_private_keys(value: SecretStr | None) -> SecretStr | None:
    """Parse the key set now, so a bad one fails at start-up rather than at the first run.

    NOTE: the sealing module's messages name the key (`key #2`, its kid), never its numbers.
    """
    if value is None:
        return None
    try:
        key_ids(value.get_secret_value())
    except SealError as error:
        raise ValueError(f"SEAL_PRIVATE_KEYS: {error}") from None
    return value


DatabaseUrl = Annotated[SecretStr, AfterValidator(_database_url)]
MigrationDatabaseUrl = Annotated[SecretStr, AfterValidator(_migration_database_url)]
SupabaseUrl = Annotated[str, AfterValidator(_supabase_url)]
SealPrivateKeys = Annotated[
    SecretStr | None, BeforeValidator(_blank_is_unset), AfterValidator(_seal_private_keys)
]

#: How every settings class reads: the environment, then `.env` in the working directory;
#: unknown names ignored; no input repeated in an error.
_ENV_SETTINGS = SettingsConfigDict(
    env_file=".env",
    env_file_encoding="utf-8",
    extra="ignore",
    hide_input_in_errors=True,
    validate_default=True,
)
_SUPABASE_URL_HELP = "Project URL, e.g. https://<ref>.supabase.co; Auth lives under /auth/v1."
_SUPABASE_ANON_KEY_HELP = "The project's anon (publishable) key, sent as `apikey` to Supabase Auth."
_SEAL_PRIVATE_KEYS_HELP = (
    "The workers' private key(s) that open sealed access tokens: a JWK or a JWK Set "
    '{"keys": [...]} as JSON; several for rotation, newest (current) first.'
)
_SEAL_DEFAULT_TTL_HELP = "Lifetime in seconds `tenantflow seal` gives a sealed token."


class SealSettings(BaseSettings):
    """The sealed-token settings: all that `tenantflow seal` and `seal-key` need, so they
    run without the database settings (on a laptop that seals a token, say)."""

    model_config = _ENV_SETTINGS

    seal_private_keys: SealPrivateKeys = Field(default=None, description=_SEAL_PRIVATE_KEYS_HELP)
    seal_max_ttl_s: int = Field(
        default=3600,
        ge=60,
        le=86400,
        description="Longest lifetime (exp - iat) a sealed access token may have, in seconds.",
    )
    seal_default_ttl_s: int = Field(
        default=900, ge=60, le=86400, description=_SEAL_DEFAULT_TTL_HELP
    )


class FaultSettings(BaseSettings):
    """Zombie detection and operator alerts: what the worker gives its flow runs (the
    heartbeat) and what the deployments bootstrap writes into Prefect's automations. Light,
    so the worker reads them without the database settings."""

    model_config = _ENV_SETTINGS

    flow_heartbeat_s: int = Field(
        default=30,
        ge=30,
        le=600,
        description=(
            "Seconds between a flow run's heartbeat events (given by the tenantflow worker to "
            "every flow run as PREFECT_FLOWS_HEARTBEAT_FREQUENCY; Prefect's floor is 30)."
        ),
    )
    zombie_after_s: int = Field(
        default=90,
        ge=10,
        le=86400,
        description=(
            "A deployment's flow run that has sent no heartbeat (nor reached a final state) "
            "for this many seconds is marked Crashed by the bootstrap's zombie automation. "
            "Must exceed FLOW_HEARTBEAT_S; about three heartbeats is Prefect's advice."
        ),
    )
    stuck_start_after_s: int = Field(
        default=600,
        ge=10,
        le=86400,
        description=(
            "A deployment's flow run that a worker took (Pending, Submitting) but that has "
            "not started Running (nor reached a final state) this many seconds later is "
            "marked Crashed by the bootstrap's automation: its worker died before starting "
            "it, or its container or Job never came up. Leave room for an image pull."
        ),
    )
    nightly_late_after_s: int = Field(
        default=26 * 3600,
        ge=10,
        le=30 * 86400,
        description=(
            "Operators are alerted when no nightly-rollup run has completed for this many "
            "seconds (the schedule is daily: 26 h leaves two hours of slack)."
        ),
    )
    # NOTE: here, not with the other database settings: the worker's housekeeping reads
    # them without the database URLs.
    db_concurrency_limit: str = Field(
        default="tenantflow-db",
        description=(
            "Name of the Prefect global concurrency limit that caps tenant transactions "
            "across all workers (strict: a missing limit is an error, not a warning)."
        ),
    )
    db_flow_slots: int = Field(
        default=5,
        ge=1,
        le=100,
        description=(
            "Slots of that limit one flow run takes (once, for its whole database work); "
            "its tenant transactions run at most this many at a time."
        ),
    )
    worker_drain_s: float = Field(
        default=0.0,
        ge=0,
        le=3600,
        description=(
            "When the tenantflow worker is told to stop (SIGTERM: `docker stop`, a pod's "
            "deletion), how long its flow runs in flight may go on before it stops them "
            "with SIGTERM (they end Crashed and give their database slots back). It takes no "
            "new run meanwhile. Keep it at least 10 s below the platform's stop timeout "
            "(`docker stop -t`, Kubernetes' terminationGracePeriodSeconds)."
        ),
    )
    worker_warm_start: bool = Field(
        default=True,
        description=(
            "Whether the tenantflow process worker keeps its next flow run's process started "
            "ahead, with Prefect and the flows' libraries already imported (a warm start: "
            "about a second less per run here). Each process still serves one run only; "
            "false starts every run's process when the run comes."
        ),
    )
    worker_wake_on_events: bool = Field(
        default=True,
        description=(
            "Whether the worker listens to Prefect's event stream for flow-run state changes "
            "in its work pool and polls at once when one comes, instead of waiting for the "
            "next poll (PREFECT_WORKER_QUERY_SECONDS). The poll stays: an event missed or a "
            "stream down costs at most one poll interval."
        ),
    )
    housekeeping_interval_s: float = Field(
        default=60.0,
        ge=5,
        le=3600,
        description=(
            "Seconds between two passes of the worker's housekeeping (tenantflow.housekeeping): "
            "sealed values removed from finished runs, squatted or missed schedule slots, a "
            "concurrency limit full with nobody holding it."
        ),
    )
    limit_stuck_after_s: int = Field(
        default=900,
        ge=60,
        le=86400,
        description=(
            "Operators are alerted when DB_CONCURRENCY_LIMIT has had more slots taken than its "
            "running flow runs can hold for this many seconds. Longer than a lease's life "
            "(DB_SLOT_LEASE_S) plus ZOMBIE_AFTER_S, so a dead run's slots are given back first."
        ),
    )
    schedule_slot_grace_s: int = Field(
        default=1800,
        ge=60,
        le=86400,
        description=(
            "Seconds after a declared schedule's slot (nightly-rollup at 02:15 UTC) when "
            "operators are alerted if no scheduled run exists for it, or it has not started."
        ),
    )
    alert_webhook_url: SecretStr | None = Field(
        default=None,
        description=(
            "Where operator alerts go: a URL that takes a JSON POST ({subject, body, source}); "
            "it may carry a token, so it is kept secret (a Prefect block's secret value). "
            "Unset: no alert automations."
        ),
    )

    @field_validator("alert_webhook_url", mode="before")
    @classmethod
    def _webhook_blank_is_unset(cls, value: Any) -> Any:
        return _blank_is_unset(value)

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_is_http(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value().strip())
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            # NOTE: never repeat the value: it may hold a token.
            raise ValueError("ALERT_WEBHOOK_URL must be an http(s) URL")
        return SecretStr(value.get_secret_value().strip())

    @model_validator(mode="after")
    def _window_exceeds_heartbeat(self) -> Self:
        if self.zombie_after_s <= self.flow_heartbeat_s:
            raise ValueError(
                f"ZOMBIE_AFTER_S={self.zombie_after_s} must exceed FLOW_HEARTBEAT_S="
                f"{self.flow_heartbeat_s}, or every healthy flow run would be marked Crashed"
            )
        return self


class Settings(SealSettings, FaultSettings):
    """Everything the worker reads from its environment."""

    database_url: DatabaseUrl = Field(
        description="Transaction-pooler URL used by flows and tasks (Supabase: port 6543)."
    )
    # NOTE: optional, because only the machines that migrate hold it: the migrate worker
    # and whoever runs `tenantflow migrate`. Tenant workers and their flow runs must not
    # (docs/operations.md); `migration_url()` refuses where it is missing.
    migration_database_url: MigrationDatabaseUrl | None = Field(
        default=None,
        description=(
            "Session-pooler URL used only by migrations (Supabase: port 5432); the owner's "
            "login, so set only where migrations run (the migrate worker, the CLI)."
        ),
    )
    supabase_url: SupabaseUrl = Field(description=_SUPABASE_URL_HELP)
    supabase_anon_key: SecretStr = Field(description=_SUPABASE_ANON_KEY_HELP)
    supabase_jwt_secret: SecretStr | None = Field(
        default=None,
        description="Legacy HS256 JWT secret; set only to verify HS256 tokens locally.",
    )
    auth_strict: bool = Field(
        default=False,
        description=(
            "Also ask Supabase Auth (GET /auth/v1/user) after a successful local check, so "
            "tokens of signed-out sessions and deleted users are refused (one call per check)."
        ),
    )
    auth_leeway_s: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="Clock skew tolerated on exp, nbf and iat, in seconds.",
    )
    schedule_early_s: float = Field(
        default=60.0,
        ge=0,
        le=600,
        description=(
            "How early before its slot a scheduled run may start and still act as the "
            "scheduler, in seconds: the worker's prefetch (10 s by default) plus clock skew. "
            "A run moved earlier through the Prefect API is refused."
        ),
    )
    schedule_late_s: float = Field(
        default=21600.0,
        ge=60,
        le=86400,
        description=(
            "How late after its slot a scheduled run may start and still act as the "
            "scheduler, in seconds (6 hours: a night's run still happens after a worker "
            "outage; later than that, an operator starts it with a sealed token)."
        ),
    )
    auth_jwks_cache_s: float = Field(
        default=600.0,
        gt=0,
        le=600,
        description="Seconds the signing keys (JWKS) are trusted before they are fetched again.",
    )
    auth_jwks_min_refetch_interval_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description=(
            "Minimum seconds between two JWKS fetches caused by an unknown key id (kid) or "
            "after a failed fetch, so made-up kids cannot hammer Supabase Auth."
        ),
    )
    auth_max_token_bytes: int = Field(
        default=8192,
        ge=1024,
        le=65536,
        description="Access tokens longer than this are refused before being parsed.",
    )
    auth_http_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Timeout of each request to Supabase Auth (JWKS and /auth/v1/user).",
    )
    auth_jwks_cache_dir: Path | None = Field(
        default_factory=lambda: (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tenantflow"
        ),
        description=(
            "Folder where the signing keys (public) are kept between flow-run processes, so a "
            "run verifies tokens while Supabase Auth is briefly unreachable; never older than "
            "AUTH_JWKS_CACHE_S. Empty: memory only."
        ),
    )

    db_pool_mode: Literal["queue", "null"] = Field(
        default="queue",
        description="Client-side pool: `queue` (QueuePool) or `null` (NullPool, no pooling).",
    )
    db_pool_size: int = Field(default=5, ge=1, le=100, description="QueuePool size.")
    db_max_overflow: int = Field(default=10, ge=0, le=100, description="QueuePool overflow.")
    db_pool_recycle: int = Field(
        default=300, ge=-1, description="Seconds after which a pooled connection is replaced."
    )
    db_pool_pre_ping: bool = Field(
        default=True, description="Test a pooled connection before handing it out."
    )
    db_pool_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to wait for a pooled connection."
    )
    db_connect_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to wait for a new database connection."
    )
    db_statement_timeout_ms: int = Field(
        default=60_000,
        ge=0,
        description="statement_timeout set with SET LOCAL in every transaction (0: none).",
    )
    db_concurrency_slots: int = Field(
        default=10,
        ge=1,
        le=1000,
        description=(
            "Size of that limit, written by the deployments bootstrap: how many tenant "
            "transactions may run at once across all workers. Keep it at or below the "
            "transaction pooler's pool size (20 locally) and at or above DB_FLOW_SLOTS."
        ),
    )
    db_slot_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a flow run waits for database slots before failing.",
    )
    db_slot_lease_s: float = Field(
        default=300.0,
        ge=60,
        le=3600,
        description=(
            "Life of the lease on a flow run's DB_CONCURRENCY_LIMIT slots, renewed by the run "
            "every three quarters of it: a run that dies unreported (its worker or machine "
            "killed) holds its slots until its lease runs out. Shorter gives them back "
            "sooner and asks more of the Prefect API's availability: a run whose renewal "
            "keeps failing for the rest of its lease stops. At least 60: the shortest lease "
            "the Prefect API renews."
        ),
    )
    tenant_batch_size: int = Field(
        default=200,
        ge=1,
        le=5000,
        description=(
            "Clients per task run in a sweep: each batch is one Prefect task run (the "
            "clients in it are still one transaction each)."
        ),
    )
    tenant_retry_window_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description=(
            "How long one client's transient database faults are retried (backoff, jitter), "
            "long enough to outlast a database restart or failover and the pooler's login "
            "retry delay after it; 0: no retries. When the database is down for everyone "
            "the sweep pauses on one probe instead."
        ),
    )
    tenant_client_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="Seconds one attempt at one client's work may take.",
    )
    tenant_shard_size: int = Field(
        default=20_000,
        ge=10,
        le=1_000_000,
        description=(
            "A sweep of more clients than this runs in shards: child flow runs through the "
            "work pool, any worker taking any shard."
        ),
    )
    tenant_shards_in_flight: int = Field(
        default=4, ge=1, le=100, description="Shard runs a sweep keeps going at once."
    )
    tenant_shard_attempts: int = Field(
        default=2,
        ge=1,
        le=10,
        description=(
            "Runs a shard gets in all: one that crashes or fails is retried alone (with its "
            "failed clients only, when it got as far as recording them)."
        ),
    )
    report_max_days: int = Field(
        default=366, ge=1, le=3660, description="Longest period a client report may cover."
    )
    migration_lock_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description=(
            "Seconds a migration waits for the migration advisory lock held by another "
            "migration before failing with 'another migration is running' (0: try once)."
        ),
    )

    @model_validator(mode="after")
    def _migration_endpoint(self) -> Settings:
        if self.migration_database_url is None:
            return self
        refusal = migration_endpoint_refusal(
            make_url(self.migration_database_url.get_secret_value()),
            make_url(self.database_url.get_secret_value()),
        )
        if refusal:
            raise ValueError(f"MIGRATION_DATABASE_URL: {refusal}")
        return self

    def migration_url(self) -> SecretStr:
        """`MIGRATION_DATABASE_URL`, the owner's login, for migrations.

        Raises:
            SettingsError: it is not set on this machine (a tenant worker never holds it).
        """
        if self.migration_database_url is None:
            raise SettingsError(
                "MIGRATION_DATABASE_URL is not set: migrations run only where the owner's "
                "login is (the migrate worker, or `tenantflow migrate` on a machine holding it)"
            )
        return self.migration_database_url


class OperatorSettings(BaseSettings):
    """What an operator's own machine needs to sign in and seal tokens for runs
    (`tenantflow login / whoami / token / operator`): Supabase Auth and the workers'
    public key. No database URL and no private key: an operator's laptop holds neither.

    NOTE: the public key is configuration the operator trusts (like an ssh known host),
    never read from Prefect, where whoever holds the API auth string could swap it.
    """

    model_config = _ENV_SETTINGS

    supabase_url: SupabaseUrl = Field(description=_SUPABASE_URL_HELP)
    supabase_anon_key: SecretStr = Field(description=_SUPABASE_ANON_KEY_HELP)
    seal_public_key: str | None = Field(
        default=None,
        description=(
            "The workers' public JWK (JSON, the output of `tenantflow seal-key public`) that "
            "`tenantflow token` seals access tokens to. Not secret, but trusted: take it from "
            "the platform team, never from Prefect."
        ),
    )
    seal_public_key_file: Path | None = Field(
        default=None,
        description="A file holding that public JWK, instead of SEAL_PUBLIC_KEY.",
    )
    tenantflow_session_file: Path | None = Field(
        default=None,
        description=(
            "Where `tenantflow login` keeps the operator's Supabase session (mode 0600 in a "
            "0700 folder). Unset: $XDG_CONFIG_HOME/tenantflow/session.json, by default "
            "~/.config/tenantflow/session.json."
        ),
    )
    auth_http_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Timeout of each request to Supabase Auth (sign-in, refresh, sign-out).",
    )

    @field_validator(
        "seal_public_key", "seal_public_key_file", "tenantflow_session_file", mode="before"
    )
    @classmethod
    def _operator_blank_is_unset(cls, value: Any) -> Any:
        return _blank_is_unset(value)

    @model_validator(mode="after")
    def _one_public_key(self) -> Self:
        if self.seal_public_key is not None and self.seal_public_key_file is not None:
            raise ValueError("set SEAL_PUBLIC_KEY or SEAL_PUBLIC_KEY_FILE, not both")
        return self


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in item["loc"]).upper() or "settings"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {message}" if not message.startswith(field) else message)
    return "invalid tenantflow settings:\n  - " + "\n  - ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (and `overrides`), raising `SettingsError`."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_format_errors(error)) from None


def load_fault_settings(**overrides: Any) -> FaultSettings:
    """Build `FaultSettings` from the environment (and `overrides`), raising `SettingsError`."""
    try:
        return FaultSettings(**overrides)
    except ValidationError as error:
        raise SettingsError(_format_errors(error)) from None


def load_operator_settings(**overrides: Any) -> OperatorSettings:
    """Build `OperatorSettings` from the environment (and `overrides`), raising `SettingsError`."""
    try:
        return OperatorSettings(**overrides)
    except ValidationError as error:
        raise SettingsError(_format_errors(error)) from None


def load_seal_settings(**overrides: Any) -> SealSettings:
    """Build `SealSettings` from the environment (and `overrides`), raising `SettingsError`."""
    try:
        return SealSettings(**overrides)
    except ValidationError as error:
        raise SettingsError(_format_errors(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Tests call `get_settings.cache_clear()`."""
    return load_settings()
