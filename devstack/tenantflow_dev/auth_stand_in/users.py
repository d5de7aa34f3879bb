"""Users of the stack's `auth.users`, and the stand-in's own `auth` tables.

Like GoTrue on Supabase, the stand-in owns `auth.sessions`, `auth.refresh_tokens` and
`auth.one_time_tokens` and creates them. Users are written as Supabase writes an email
sign-up, as the cluster's superuser (an administrator seeding a project); the worker's own
code never writes `auth.users`.

Passwords are kept in `auth.users.encrypted_password` as a salted scrypt hash
(`$scrypt$ln=14,r=8,p=1$<salt>$<hash>`, base64): GoTrue writes bcrypt there, but bcrypt is
not a dependency of the dev stack and nothing but the stand-in reads the column.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg

from tenantflow.auth import OPERATOR_APP_METADATA_KEY, OPERATOR_ROLE
from tenantflow.errors import TenantflowError
from tenantflow_dev.config import StackConfig

__all__ = [
    "USER_COLUMNS",
    "AuthRefusal",
    "UnknownUser",
    "admin_connection",
    "create_user",
    "delete_user",
    "ensure_auth_schema",
    "hash_password",
    "password_matches",
    "set_operator",
    "user_json",
]

_SESSIONS_DDL = """
SELECT pg_advisory_xact_lock(hashtext('tenantflow.auth.sessions'));
CREATE TABLE IF NOT EXISTS auth.sessions (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    aal text NOT NULL DEFAULT 'aal1',
    not_after timestamptz
);
CREATE INDEX IF NOT EXISTS sessions_user_id_idx ON auth.sessions (user_id);
ALTER TABLE auth.sessions OWNER TO supabase_auth_admin;
-- NOTE: GoTrue keeps refresh tokens in clear; the stand-in keeps their SHA-256 only.
CREATE TABLE IF NOT EXISTS auth.refresh_tokens (
    id bigserial PRIMARY KEY,
    token_hash text NOT NULL UNIQUE,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    session_id uuid NOT NULL REFERENCES auth.sessions (id) ON DELETE CASCADE,
    parent_hash text,
    revoked boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE auth.sessions ADD COLUMN IF NOT EXISTS sign_in_method text NOT NULL
    DEFAULT 'password';
CREATE INDEX IF NOT EXISTS refresh_tokens_session_id_idx ON auth.refresh_tokens (session_id);
ALTER TABLE auth.refresh_tokens OWNER TO supabase_auth_admin;
CREATE TABLE IF NOT EXISTS auth.one_time_tokens (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    token_type text NOT NULL,
    token_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS one_time_tokens_user_id_idx ON auth.one_time_tokens (user_id);
ALTER TABLE auth.one_time_tokens OWNER TO supabase_auth_admin;
"""
_OWN_TABLES = ("auth.sessions", "auth.refresh_tokens", "auth.one_time_tokens")

# NOTE: scrypt's cost: ~16 MB and tens of milliseconds per hash here.
_SCRYPT_LOG_N, _SCRYPT_R, _SCRYPT_P = 14, 8, 1

#: The columns of `auth.users` that tokens and the `/user` endpoint are made from.
USER_COLUMNS = """
    id, aud, role, email, phone, email_confirmed_at, last_sign_in_at,
    raw_app_meta_data::text AS app_metadata, raw_user_meta_data::text AS user_metadata,
    is_anonymous, created_at, updated_at
"""


class UnknownUser(TenantflowError, LookupError):
    """No user with this email in `auth.users`."""


class AuthRefusal(TenantflowError):
    """A request GoTrue refuses: its HTTP status, `error_code` and message."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message


def _rfc3339(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def user_json(row: asyncpg.Record) -> dict[str, Any]:
    """GoTrue's user object of a `USER_COLUMNS` row (`omitempty` fields left out when empty)."""
    body: dict[str, Any] = {
        "id": str(row["id"]),
        "aud": row["aud"] or "",
        "role": row["role"] or "",
        "email": row["email"] or "",
        "email_confirmed_at": _rfc3339(row["email_confirmed_at"]),
        "phone": row["phone"] or "",
        "confirmed_at": _rfc3339(row["email_confirmed_at"]),
        "last_sign_in_at": _rfc3339(row["last_sign_in_at"]),
        "app_metadata": json.loads(row["app_metadata"] or "{}"),
        "user_metadata": json.loads(row["user_metadata"] or "{}"),
        "identities": [],
        "created_at": _rfc3339(row["created_at"]),
        "updated_at": _rfc3339(row["updated_at"]),
        "is_anonymous": bool(row["is_anonymous"]),
    }
    return {key: value for key, value in body.items() if value is not None}


# --------------------------------------------------------------------------- keys


async def admin_connection(config: StackConfig) -> asyncpg.Connection:
    """A direct connection to the cluster as its superuser (`supabase_admin`)."""
    return await asyncpg.connect(**config.connect_parts(config.pg_port, admin=True))


async def ensure_auth_schema(config: StackConfig, conn: asyncpg.Connection | None = None) -> None:
    """Create the stand-in's own tables (`auth.sessions`, `auth.refresh_tokens`,
    `auth.one_time_tokens`), as GoTrue owns them on Supabase."""
    own = conn is None
    conn = conn or await admin_connection(config)
    try:
        missing = await conn.fetchval(
            "SELECT bool_or(to_regclass(name) IS NULL) FROM unnest($1::text[]) AS name",
            list(_OWN_TABLES),
        )
        if missing:
            async with conn.transaction():
                await conn.execute(_SESSIONS_DDL)
    finally:
        if own:
            await conn.close()


def hash_password(password: str) -> str:
    """A salted scrypt hash of `password`, as `auth.users.encrypted_password` keeps it."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=2**_SCRYPT_LOG_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return (
        f"$scrypt$ln={_SCRYPT_LOG_N},r={_SCRYPT_R},p={_SCRYPT_P}"
        f"${b64(salt).decode()}${b64(digest).decode()}"
    )


def password_matches(password: str, encrypted: str | None) -> bool:
    """Whether `password` is the one `hash_password()` hashed into `encrypted`."""
    if not encrypted or not encrypted.startswith("$scrypt$"):
        return False
    try:
        _, _, params, salt, digest = encrypted.split("$")
        cost = dict(part.split("=") for part in params.split(","))
        computed = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=2 ** int(cost["ln"]),
            r=int(cost["r"]),
            p=int(cost["p"]),
            dklen=32,
        )
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(computed, base64.b64decode(digest))


def _app_metadata(*, operator: bool) -> dict[str, Any]:
    metadata: dict[str, Any] = {"provider": "email", "providers": ["email"]}
    if operator:
        metadata[OPERATOR_APP_METADATA_KEY] = [OPERATOR_ROLE]
    return metadata


async def create_user(
    config: StackConfig,
    email: str,
    *,
    operator: bool = False,
    is_anonymous: bool = False,
    user_id: uuid.UUID | None = None,
    user_metadata: Mapping[str, Any] | None = None,
    password: str | None = None,
    conn: asyncpg.Connection | None = None,
) -> uuid.UUID:
    """Insert (or refresh) a confirmed email user in `auth.users` and return its id.

    `raw_app_meta_data` is what Supabase writes for an email sign-up (`provider`,
    `providers`), plus `{"roles": ["tenantflow_operator"]}` for operators. Idempotent on email:
    an existing user keeps its id and gets the given metadata. `password` (hashed) lets the
    user sign in with `grant_type=password`; without it an existing user keeps its password.
    """
    own = conn is None
    conn = conn or await admin_connection(config)
    try:
        found: uuid.UUID = await conn.fetchval(
            """
            INSERT INTO auth.users (
                instance_id, id, aud, role, email, email_confirmed_at,
                raw_app_meta_data, raw_user_meta_data, is_anonymous, encrypted_password
            )
            VALUES ('00000000-0000-0000-0000-000000000000', $1, 'authenticated',
                    'authenticated', lower($2), now(), $3::jsonb, $4::jsonb, $5, $6)
            ON CONFLICT (email) WHERE is_sso_user = false DO UPDATE
               SET raw_app_meta_data = excluded.raw_app_meta_data,
                   raw_user_meta_data = excluded.raw_user_meta_data,
                   is_anonymous = excluded.is_anonymous,
                   encrypted_password = coalesce(
                       excluded.encrypted_password, auth.users.encrypted_password),
                   updated_at = now()
            RETURNING id
            """,
            user_id or uuid.uuid4(),
            email,
            json.dumps(_app_metadata(operator=operator)),
            json.dumps({"email_verified": True, **(user_metadata or {})}),
            is_anonymous,
            hash_password(password) if password is not None else None,
        )
    finally:
        if own:
            await conn.close()
    return found


async def set_operator(config: StackConfig, email: str, granted: bool) -> None:
    """Grant or revoke the operator role in `raw_app_meta_data` (tokens keep the old claim)."""
    conn = await admin_connection(config)
    try:
        status = await conn.execute(
            """
            UPDATE auth.users
               SET raw_app_meta_data = jsonb_set(
                       coalesce(raw_app_meta_data, '{}'::jsonb), ARRAY[$2::text],
                       (coalesce(raw_app_meta_data -> $2, '[]'::jsonb) - $3)
                       || CASE WHEN $4 THEN jsonb_build_array($3::text) ELSE '[]'::jsonb END),
                   updated_at = now()
             WHERE email = lower($1)
            """,
            email,
            OPERATOR_APP_METADATA_KEY,
            OPERATOR_ROLE,
            granted,
        )
    finally:
        await conn.close()
    if status == "UPDATE 0":
        raise UnknownUser(f"no user with email {email!r} in auth.users")


async def delete_user(config: StackConfig, email: str) -> bool:
    """Delete a user (its sessions go with it). Returns whether one was deleted."""
    conn = await admin_connection(config)
    try:
        status = await conn.execute("DELETE FROM auth.users WHERE email = lower($1)", email)
    finally:
        await conn.close()
    return bool(status != "DELETE 0")
