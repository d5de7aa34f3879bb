"""Users of the stack's `auth.users`, and the stand-in's own `auth.sessions` table.

Like GoTrue on Supabase, the stand-in owns `auth.sessions` and creates it. Users are
written as Supabase writes an email sign-up, as the cluster's superuser (an administrator
seeding a project); the worker's own code never writes `auth.users`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from tenantflow.auth import OPERATOR_APP_METADATA_KEY, OPERATOR_ROLE
from tenantflow.errors import TenantflowError
from tenantflow_dev.config import StackConfig

__all__ = [
    "USER_COLUMNS",
    "UnknownUser",
    "admin_connection",
    "create_user",
    "delete_user",
    "ensure_auth_schema",
    "set_operator",
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
"""

#: The columns of `auth.users` that tokens and the `/user` endpoint are made from.
USER_COLUMNS = """
    id, aud, role, email, phone, email_confirmed_at, last_sign_in_at,
    raw_app_meta_data::text AS app_metadata, raw_user_meta_data::text AS user_metadata,
    is_anonymous, created_at, updated_at
"""


class UnknownUser(TenantflowError, LookupError):
    """No user with this email in `auth.users`."""


# --------------------------------------------------------------------------- keys


async def admin_connection(config: StackConfig) -> asyncpg.Connection:
    """A direct connection to the cluster as its superuser (`supabase_admin`)."""
    return await asyncpg.connect(**config.connect_parts(config.pg_port, admin=True))


async def ensure_auth_schema(config: StackConfig, conn: asyncpg.Connection | None = None) -> None:
    """Create `auth.sessions` (the stand-in's own table, as GoTrue owns it on Supabase)."""
    own = conn is None
    conn = conn or await admin_connection(config)
    try:
        if await conn.fetchval("SELECT to_regclass('auth.sessions')") is None:
            async with conn.transaction():
                await conn.execute(_SESSIONS_DDL)
    finally:
        if own:
            await conn.close()


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
    conn: asyncpg.Connection | None = None,
) -> uuid.UUID:
    """Insert (or refresh) a confirmed email user in `auth.users` and return its id.

    `raw_app_meta_data` is what Supabase writes for an email sign-up (`provider`,
    `providers`), plus `{"roles": ["tenantflow_operator"]}` for operators. Idempotent on email:
    an existing user keeps its id and gets the given metadata.
    """
    own = conn is None
    conn = conn or await admin_connection(config)
    try:
        found: uuid.UUID = await conn.fetchval(
            """
            INSERT INTO auth.users (
                instance_id, id, aud, role, email, email_confirmed_at,
                raw_app_meta_data, raw_user_meta_data, is_anonymous
            )
            VALUES ('00000000-0000-0000-0000-000000000000', $1, 'authenticated',
                    'authenticated', lower($2), now(), $3::jsonb, $4::jsonb, $5)
            ON CONFLICT (email) WHERE is_sso_user = false DO UPDATE
               SET raw_app_meta_data = excluded.raw_app_meta_data,
                   raw_user_meta_data = excluded.raw_user_meta_data,
                   is_anonymous = excluded.is_anonymous,
                   updated_at = now()
            RETURNING id
            """,
            user_id or uuid.uuid4(),
            email,
            json.dumps(_app_metadata(operator=operator)),
            json.dumps({"email_verified": True, **(user_metadata or {})}),
            is_anonymous,
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
