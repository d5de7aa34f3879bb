"""Where the local stack lives and which ports it uses.

Every value has an environment override so a second stack (the stack's own tests)
can run beside the developer's without touching it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import jwt

from tenantflow.sealing import generate_private_key, public_key

__all__ = ["PrefectTopology", "StackConfig", "StackSecrets"]

SERVICE_USER = "postgres"
#: The workers' own database login (least privilege); created by the stack before the
#: migrations run, as a project's administrator would on Supabase.
WORKER_DB_ROLE = "tenantflow_worker"
#: The unprivileged OS user the local tenant worker (and its flow runs) runs as when the
#: stack is started by root; created by the stack itself when missing.
WORKER_USER = "tenantflow"
#: The OS user of the `migrate` pool's worker, the only one holding the schema owner's login:
#: another user, so a tenant flow run can read neither its environment nor its home.
MIGRATE_WORKER_USER = "tenantflow-migrate"
#: The user name of the Prefect API's basic auth (the password is per stack folder).
PREFECT_API_USER = "tenantflow"
#: The Prefect server's own database in the stack's cluster, and its login (the owner of
#: that database and nothing else).
PREFECT_DB_NAME = "prefect"
PREFECT_DB_ROLE = "prefect"

PrefectDatabase = Literal["postgres", "sqlite"]
PREFECT_DATABASES: tuple[PrefectDatabase, ...] = ("postgres", "sqlite")

#: How the stack runs Prefect: one `prefect server start` (the default), or `ha`: API
#: replicas behind a load balancer, the background services in a process of their own,
#: and Redis between them (Prefect's several-server setup).
PrefectTopology = Literal["single", "ha"]
PREFECT_TOPOLOGIES: tuple[PrefectTopology, ...] = ("single", "ha")
#: What Prefect's clients (workers, flow runs, the CLI) need on the `ha` topology: while
#: Redis is away (a restart, a failover) the API replicas answer 500 to the requests that
#: need it (a state change, a lease's release), and Prefect's client retries only 429,
#: 502, 503 and 408 by itself. Retried with its backoff (about 30 s in all), they go
#: through once Redis is back; the request failed before it changed anything.
PREFECT_HA_CLIENT = {"PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"}
#: The file in a stack folder that records the topology its last `up` ran.
TOPOLOGY_RECORD = "prefect-topology"


# NOTE: the same payloads as the Supabase CLI's demo keys: legacy API keys are HS256 JWTs
# signed with the project's JWT secret, without `sub`, and valid for years.
_API_KEY_EXPIRY = 1983812996
_API_KEY_ISSUER = "supabase-demo"


@dataclass(frozen=True)
class StackSecrets:
    """Passwords and the legacy JWT secret, generated once per stack folder; never printed.

    `prefect_auth_string` (`user:password`, the basic auth of the stack's Prefect API) is
    the exception: it is what an operator pastes into the Prefect UI's login form, so
    `tenantflow-dev up` shows it.

    The API keys are derived from `jwt_secret` as Supabase derives its legacy `anon` and
    `service_role` keys: HS256 JWTs with the role and no user.
    """

    admin_password: str
    postgres_password: str
    worker_password: str
    jwt_secret: str
    #: The workers' key for sealed access tokens (a private EC P-256 JWK, JSON).
    seal_private_key: str
    prefect_auth_string: str
    #: The password of the Prefect server's database role `prefect`.
    prefect_db_password: str
    #: The password of the `ha` topology's Redis (`requirepass`).
    redis_password: str
    #: Seeds the demo users' passwords (`demo_password()`): random per stack folder.
    demo_password_seed: str

    @property
    def anon_key(self) -> str:
        return self._api_key("anon")

    @property
    def service_role_key(self) -> str:
        return self._api_key("service_role")

    def demo_password(self, email: str) -> str:
        """The sign-in password of a demo user of this stack (`tenantflow-dev up` prints it)."""
        digest = hmac.new(
            self.demo_password_seed.encode(), email.strip().lower().encode(), hashlib.sha256
        ).digest()
        return base64.urlsafe_b64encode(digest[:15]).decode()

    def _api_key(self, role: str) -> str:
        claims = {"iss": _API_KEY_ISSUER, "role": role, "exp": _API_KEY_EXPIRY}
        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    @classmethod
    def load_or_create(cls, path: Path) -> StackSecrets:
        fields = (
            "admin_password",
            "postgres_password",
            "worker_password",
            "jwt_secret",
            "seal_private_key",
            "prefect_auth_string",
            "prefect_db_password",
            "redis_password",
            "demo_password_seed",
        )
        if path.exists():
            data = json.loads(path.read_text())
            if all(k in data for k in fields):
                return cls(**{k: data[k] for k in fields})
        path.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: several processes (tests, the Auth stand-in) may create or upgrade the file
        # at once; the lock makes them agree on one set of secrets.
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(path.read_text()) if path.exists() else {}
            created = cls(
                admin_password=data.get("admin_password") or secrets.token_urlsafe(24),
                postgres_password=data.get("postgres_password") or secrets.token_urlsafe(24),
                worker_password=data.get("worker_password") or secrets.token_urlsafe(24),
                jwt_secret=data.get("jwt_secret") or secrets.token_urlsafe(48),
                seal_private_key=data.get("seal_private_key") or generate_private_key(),
                prefect_auth_string=data.get("prefect_auth_string")
                or f"{PREFECT_API_USER}:{secrets.token_urlsafe(24)}",
                prefect_db_password=data.get("prefect_db_password") or secrets.token_urlsafe(24),
                redis_password=data.get("redis_password") or secrets.token_urlsafe(24),
                demo_password_seed=data.get("demo_password_seed") or secrets.token_urlsafe(32),
            )
            temporary = path.with_suffix(".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(created.__dict__, handle)
            os.replace(temporary, path)
        return created


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _prefect_topology(stack_dir: Path) -> PrefectTopology:
    """TENANTFLOW_PREFECT_TOPOLOGY, else what the stack folder's last `up` ran, else single."""
    value = (os.environ.get("TENANTFLOW_PREFECT_TOPOLOGY") or "").strip().lower()
    if not value:
        record = stack_dir / TOPOLOGY_RECORD
        value = record.read_text().strip() if record.exists() else "single"
    for choice in PREFECT_TOPOLOGIES:
        if value == choice:
            return choice
    raise ValueError(
        f"TENANTFLOW_PREFECT_TOPOLOGY must be one of {', '.join(PREFECT_TOPOLOGIES)}, not {value!r}"
    )


def _env_ports(name: str) -> tuple[int, ...] | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise ValueError(f"{name} must be ports separated by commas, not {value!r}") from None


def _prefect_database() -> PrefectDatabase:
    value = (os.environ.get("TENANTFLOW_PREFECT_DATABASE") or "postgres").strip().lower()
    for choice in PREFECT_DATABASES:
        if value == choice:
            return choice
    raise ValueError(
        f"TENANTFLOW_PREFECT_DATABASE must be one of {', '.join(PREFECT_DATABASES)}, not {value!r}"
    )


@dataclass(frozen=True)
class StackConfig:
    """Folders and ports of one local stack."""

    project_dir: Path
    stack_dir: Path
    pg_port: int = 54322
    transaction_pooler_port: int = 6543
    session_pooler_port: int = 54329
    auth_port: int = 54321
    prefect_port: int = 4200
    pooler_pool_size: int = 20
    host: str = "127.0.0.1"
    database: str = "postgres"
    #: Where the stack's Prefect server keeps its data: its own database in the stack's
    #: PostgreSQL (the default, as a production server would), or SQLite in its folder.
    prefect_database: PrefectDatabase = "postgres"
    #: A throwaway test cluster: PostgreSQL runs without fsync, synchronous commits and
    #: full-page writes, so a crash may lose acknowledged commits. Never the stack
    #: `make up` starts; only tests that delete the cluster afterwards set it
    #: (TENANTFLOW_THROWAWAY_CLUSTER=1).
    throwaway: bool = False
    #: The Auth stand-in's GoTrue settings: how long a used refresh token is accepted again
    #: (GOTRUE_SECURITY_REFRESH_TOKEN_REUSE_INTERVAL, 10 s) and how long an emailed one-time
    #: code is good for (GOTRUE_MAILER_OTP_EXP, 1 h).
    auth_refresh_token_reuse_interval_s: float = 10.0
    auth_otp_expiry_s: float = 3600.0
    #: `single` (one Prefect server) or `ha` (replicas, services process, Redis, HAProxy
    #: on `prefect_port`): TENANTFLOW_PREFECT_TOPOLOGY or `tenantflow-dev up --ha`.
    prefect_topology: PrefectTopology = "single"
    #: The `ha` topology's Redis port (TENANTFLOW_REDIS_PORT; None: the Prefect port + 10).
    ha_redis_port: int | None = None
    #: The `ha` topology's API replicas' ports, one per replica
    #: (TENANTFLOW_PREFECT_REPLICA_PORTS; None: the two ports after the Prefect port).
    ha_replica_ports: tuple[int, ...] | None = None

    @classmethod
    def from_env(cls, project_dir: Path | None = None) -> StackConfig:
        project = Path(
            os.environ.get("TENANTFLOW_PROJECT_DIR") or project_dir or Path.cwd()
        ).resolve()
        stack = Path(os.environ.get("TENANTFLOW_STACK_DIR") or project / ".stack").resolve()
        return cls(
            project_dir=project,
            stack_dir=stack,
            pg_port=_env_int("TENANTFLOW_PG_PORT", 54322),
            transaction_pooler_port=_env_int("TENANTFLOW_TRANSACTION_POOLER_PORT", 6543),
            session_pooler_port=_env_int("TENANTFLOW_SESSION_POOLER_PORT", 54329),
            auth_port=_env_int("TENANTFLOW_AUTH_PORT", 54321),
            prefect_port=_env_int("TENANTFLOW_PREFECT_PORT", 4200),
            prefect_database=_prefect_database(),
            throwaway=os.environ.get("TENANTFLOW_THROWAWAY_CLUSTER", "").strip() == "1",
            auth_refresh_token_reuse_interval_s=_env_float(
                "TENANTFLOW_AUTH_REFRESH_TOKEN_REUSE_INTERVAL", 10.0
            ),
            auth_otp_expiry_s=_env_float("TENANTFLOW_AUTH_OTP_EXPIRY", 3600.0),
            prefect_topology=_prefect_topology(stack),
            ha_redis_port=_env_int("TENANTFLOW_REDIS_PORT", 0) or None,
            ha_replica_ports=_env_ports("TENANTFLOW_PREFECT_REPLICA_PORTS"),
        )

    @property
    def env_file(self) -> Path:
        """The project's `.env` for the project's own stack (`.stack`); any other stack
        (a second one beside it, as `make test` runs) keeps its `.env` in its own folder,
        so it never overwrites the settings of the developer's stack."""
        if self.stack_dir == self.project_dir / ".stack":
            return self.project_dir / ".env"
        return self.stack_dir / ".env"

    @property
    def secrets_file(self) -> Path:
        return self.stack_dir / "secrets.json"

    @cached_property
    def secrets(self) -> StackSecrets:
        return StackSecrets.load_or_create(self.secrets_file)

    def url(self, port: int, *, user: str = "postgres", password: str | None = None) -> str:
        """A postgresql+asyncpg URL to the local cluster or one of its poolers."""
        secret = password if password is not None else self.secrets.postgres_password
        return f"postgresql+asyncpg://{user}:{secret}@{self.host}:{port}/{self.database}"

    def connect_parts(self, port: int, *, admin: bool = False) -> dict[str, object]:
        """asyncpg.connect() keyword arguments for the cluster or a pooler."""
        return {
            "host": self.host,
            "port": port,
            "user": "supabase_admin" if admin else "postgres",
            "password": self.secrets.admin_password if admin else self.secrets.postgres_password,
            "database": self.database,
        }

    @property
    def database_url(self) -> str:
        """The workers' URL: the transaction pooler, as the least-privilege worker role."""
        return self.url(
            self.transaction_pooler_port,
            user=WORKER_DB_ROLE,
            password=self.secrets.worker_password,
        )

    @property
    def owner_transaction_url(self) -> str:
        """The transaction pooler as the tables' owner `postgres` (set-up and tests only)."""
        return self.url(self.transaction_pooler_port)

    @property
    def migration_database_url(self) -> str:
        return self.url(self.session_pooler_port)

    @property
    def direct_database_url(self) -> str:
        return self.url(self.pg_port)

    @property
    def admin_database_url(self) -> str:
        """The cluster's superuser (Supabase's `supabase_admin`): set-up and tests only."""
        return self.url(self.pg_port, user="supabase_admin", password=self.secrets.admin_password)

    @property
    def supabase_url(self) -> str:
        return f"http://{self.host}:{self.auth_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def redis_port(self) -> int:
        return self.ha_redis_port or self.prefect_port + 10

    @property
    def prefect_replica_ports(self) -> tuple[int, ...]:
        return self.ha_replica_ports or (self.prefect_port + 1, self.prefect_port + 2)

    @property
    def redis_url(self) -> str:
        """The `ha` topology's Redis, with its password: Prefect's processes only.

        NOTE: `retry_on_timeout=true` gives each pooled connection one retry on a
        connection error too (redis-py's default is none): after a Redis restart every
        pooled connection is dead, and without it the first command on each fails (an
        API request answering 500 after its database change was committed, the docket's
        scheduler loop erring) instead of reconnecting.
        """
        password = quote(self.secrets.redis_password, safe="")
        return f"redis://:{password}@{self.host}:{self.redis_port}/0?retry_on_timeout=true"

    @property
    def prefect_home(self) -> Path:
        """The Prefect server's folder (its SQLite database, if any): root's only, 0700."""
        return self.stack_dir / "prefect"

    @property
    def prefect_database_url(self) -> str:
        """The Prefect server's database: SQLite in its folder, or PostgreSQL directly.

        NOTE: never through PgBouncer: the server keeps session state and prepared
        statements on its connections. The URL holds the `prefect` role's password: it goes
        into the server's own environment only, never into `.env` or any output.
        """
        if self.prefect_database == "sqlite":
            return f"sqlite+aiosqlite:///{self.prefect_home / 'prefect.db'}"
        password = quote(self.secrets.prefect_db_password, safe="")
        return (
            f"postgresql+asyncpg://{PREFECT_DB_ROLE}:{password}"
            f"@{self.host}:{self.pg_port}/{PREFECT_DB_NAME}"
        )

    def prefect_api_headers(self) -> dict[str, str]:
        """The basic-auth header the stack's Prefect API wants on every request."""
        token = base64.b64encode(self.secrets.prefect_auth_string.encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def location_environment(self) -> dict[str, str]:
        """The TENANTFLOW_* variables under which `from_env()` gives this same stack."""
        return {
            "TENANTFLOW_PROJECT_DIR": str(self.project_dir),
            "TENANTFLOW_STACK_DIR": str(self.stack_dir),
            "TENANTFLOW_PG_PORT": str(self.pg_port),
            "TENANTFLOW_TRANSACTION_POOLER_PORT": str(self.transaction_pooler_port),
            "TENANTFLOW_SESSION_POOLER_PORT": str(self.session_pooler_port),
            "TENANTFLOW_AUTH_PORT": str(self.auth_port),
            "TENANTFLOW_PREFECT_PORT": str(self.prefect_port),
            "TENANTFLOW_PREFECT_DATABASE": self.prefect_database,
            "TENANTFLOW_THROWAWAY_CLUSTER": "1" if self.throwaway else "0",
            "TENANTFLOW_AUTH_REFRESH_TOKEN_REUSE_INTERVAL": str(
                self.auth_refresh_token_reuse_interval_s
            ),
            "TENANTFLOW_AUTH_OTP_EXPIRY": str(self.auth_otp_expiry_s),
            "TENANTFLOW_PREFECT_TOPOLOGY": self.prefect_topology,
            "TENANTFLOW_REDIS_PORT": str(self.redis_port),
            "TENANTFLOW_PREFECT_REPLICA_PORTS": ",".join(map(str, self.prefect_replica_ports)),
        }

    def environment(self) -> dict[str, str]:
        """What the CLI (`tenantflow migrate` included) and Prefect's CLI need to talk to this
        stack, as `.env` holds it. The tenant worker gets all but MIGRATION_DATABASE_URL
        (`LocalWorker.environment`)."""
        return {
            "DATABASE_URL": self.database_url,
            "MIGRATION_DATABASE_URL": self.migration_database_url,
            "SUPABASE_URL": self.supabase_url,
            "SUPABASE_ANON_KEY": self.secrets.anon_key,
            "SEAL_PRIVATE_KEYS": self.secrets.seal_private_key,
            # NOTE: public: what the operator CLI seals with. The service-role key is never
            # here (`tenantflow-dev status --secrets` shows it to the developer).
            "SEAL_PUBLIC_KEY": public_key(self.secrets.seal_private_key),
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_API_AUTH_STRING": self.secrets.prefect_auth_string,
            **(PREFECT_HA_CLIENT if self.prefect_topology == "ha" else {}),
        }
