"""Signing a user in: a session in `auth.sessions`, its rotating refresh tokens in
`auth.refresh_tokens`, and the access token GoTrue would mint."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from typing import Any, Literal

import asyncpg

from tenantflow.auth import OPERATOR_APP_METADATA_KEY, OPERATOR_ROLE
from tenantflow_dev.auth_stand_in.keys import TokenAlgorithm, sign_token
from tenantflow_dev.auth_stand_in.users import (
    USER_COLUMNS,
    AuthRefusal,
    UnknownUser,
    admin_connection,
    ensure_auth_schema,
    user_json,
)
from tenantflow_dev.config import StackConfig

__all__ = ["ACCESS_TOKEN_LIFETIME_S", "mint_access_token", "refresh_session", "start_session"]

#: GoTrue's default `GOTRUE_JWT_EXP`.
ACCESS_TOKEN_LIFETIME_S = 3600

#: How a session was started, as the token's `amr` names it.
SignInMethod = Literal["password", "otp", "anonymous"]


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _claims(
    config: StackConfig,
    user: asyncpg.Record,
    session_id: uuid.UUID,
    *,
    method: SignInMethod,
    expires_in: int,
    operator: bool = False,
) -> dict[str, Any]:
    """GoTrue's claims (`iss`, `sub`, `aud`, `exp`, `iat`, `email`, `phone`, `app_metadata`,
    `user_metadata`, `role`, `aal`, `amr`, `session_id`, `is_anonymous`) of the user's row."""
    app_metadata = json.loads(user["app_metadata"] or "{}")
    if operator:
        roles = app_metadata.get(OPERATOR_APP_METADATA_KEY) or []
        app_metadata[OPERATOR_APP_METADATA_KEY] = [*roles, OPERATOR_ROLE]
    now = int(time.time())
    return {
        "iss": f"{config.supabase_url}/auth/v1",
        "sub": str(user["id"]),
        "aud": user["aud"] or "authenticated",
        "exp": now + expires_in,
        "iat": now,
        "email": user["email"] or "",
        "phone": user["phone"] or "",
        "app_metadata": app_metadata,
        "user_metadata": json.loads(user["user_metadata"] or "{}"),
        "role": user["role"] or "authenticated",
        "aal": "aal1",
        "amr": [{"method": "anonymous" if user["is_anonymous"] else method, "timestamp": now}],
        "session_id": str(session_id),
        "is_anonymous": bool(user["is_anonymous"]),
    }


async def _new_session(
    conn: asyncpg.Connection, user_id: uuid.UUID, method: SignInMethod = "password"
) -> uuid.UUID:
    session_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO auth.sessions (id, user_id, aal, sign_in_method) VALUES ($1, $2, 'aal1', $3)",
        session_id,
        user_id,
        method,
    )
    return session_id


async def _new_refresh_token(
    conn: asyncpg.Connection,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
    parent_hash: str | None = None,
) -> str:
    token = secrets.token_urlsafe(16)
    await conn.execute(
        "INSERT INTO auth.refresh_tokens (token_hash, user_id, session_id, parent_hash) "
        "VALUES ($1, $2, $3, $4)",
        _token_hash(token),
        user_id,
        session_id,
        parent_hash,
    )
    return token


def _session_json(
    config: StackConfig,
    user: asyncpg.Record,
    session_id: uuid.UUID,
    refresh_token: str,
    *,
    method: SignInMethod,
) -> dict[str, Any]:
    """GoTrue's session body (`AccessTokenResponse`)."""
    claims = _claims(config, user, session_id, method=method, expires_in=ACCESS_TOKEN_LIFETIME_S)
    return {
        "access_token": sign_token(config, claims),
        "token_type": "bearer",
        "expires_in": ACCESS_TOKEN_LIFETIME_S,
        "expires_at": claims["exp"],
        "refresh_token": refresh_token,
        "user": user_json(user),
    }


async def start_session(
    config: StackConfig, conn: asyncpg.Connection, user_id: uuid.UUID, *, method: SignInMethod
) -> dict[str, Any]:
    """Sign a user in (a password or a one-time code checked): a new session, its first
    refresh token, `last_sign_in_at`, and GoTrue's session body."""
    async with conn.transaction():
        session_id = await _new_session(conn, user_id, method)
        refresh_token = await _new_refresh_token(conn, user_id, session_id)
        user = await conn.fetchrow(
            f"UPDATE auth.users SET last_sign_in_at = now() WHERE id = $1 "  # noqa: S608
            f"RETURNING {USER_COLUMNS}",
            user_id,
        )
    return _session_json(config, user, session_id, refresh_token, method=method)


async def refresh_session(
    config: StackConfig, conn: asyncpg.Connection, refresh_token: str
) -> dict[str, Any]:
    """`grant_type=refresh_token`: rotate the refresh token and mint a new access token.

    As GoTrue does: a token is used once, and the new access token carries the user's
    `app_metadata` as it is now. A used (revoked) token is accepted again within
    `config.auth_refresh_token_reuse_interval_s` of its use, so a client that lost the
    answer can retry; later it is refused and the whole session's tokens are revoked (a
    reuse is taken for a stolen token). A token of a signed-out session is unknown.

    Raises:
        AuthRefusal: 400 `refresh_token_not_found` or `refresh_token_already_used`.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT t.id, t.token_hash, t.user_id, t.session_id, t.revoked, s.sign_in_method, "
            "       t.updated_at + make_interval(secs => $2) < now() AS reuse_over "
            "  FROM auth.refresh_tokens t JOIN auth.sessions s ON s.id = t.session_id "
            " WHERE t.token_hash = $1 AND (s.not_after IS NULL OR s.not_after > now()) "
            "   FOR UPDATE OF t",
            _token_hash(refresh_token),
            config.auth_refresh_token_reuse_interval_s,
        )
        if row is None:
            raise AuthRefusal(
                400, "refresh_token_not_found", "Invalid Refresh Token: Refresh Token Not Found"
            )
        if row["revoked"] and row["reuse_over"]:
            await conn.execute(
                "UPDATE auth.refresh_tokens SET revoked = true, updated_at = now() "
                "WHERE session_id = $1 AND NOT revoked",
                row["session_id"],
            )
            # NOTE: the revocation must stay although the request is refused.
            refused = AuthRefusal(
                400, "refresh_token_already_used", "Invalid Refresh Token: Already Used"
            )
        else:
            refused = None
            if not row["revoked"]:
                await conn.execute(
                    "UPDATE auth.refresh_tokens SET revoked = true, updated_at = now() "
                    "WHERE id = $1",
                    row["id"],
                )
            new_token = await _new_refresh_token(
                conn, row["user_id"], row["session_id"], parent_hash=row["token_hash"]
            )
            await conn.execute(
                "UPDATE auth.sessions SET updated_at = now() WHERE id = $1", row["session_id"]
            )
            user = await conn.fetchrow(
                f"SELECT {USER_COLUMNS} FROM auth.users WHERE id = $1",  # noqa: S608
                row["user_id"],
            )
    if refused is not None:
        raise refused
    method: SignInMethod = row["sign_in_method"]
    return _session_json(config, user, row["session_id"], new_token, method=method)


async def mint_access_token(
    config: StackConfig,
    email: str,
    *,
    operator: bool = False,
    expires_in: int = 3600,
    algorithm: TokenAlgorithm = "ES256",
    kid: str | None = None,
) -> str:
    """Sign a user in without a password: create a session and mint the access token
    Supabase Auth would issue (for tests and `tenantflow-dev token`).

    `operator=True` puts the operator grant into the token's `app_metadata` even when
    `auth.users` no longer has it, as a token issued before a revocation would carry it.

    Raises:
        UnknownUser: no user with this email.
    """
    conn = await admin_connection(config)
    try:
        await ensure_auth_schema(config, conn)
        user = await conn.fetchrow(
            f"SELECT {USER_COLUMNS} FROM auth.users WHERE email = lower($1)",  # noqa: S608
            email,
        )
        if user is None:
            raise UnknownUser(f"no user with email {email!r} in auth.users")
        session_id = await _new_session(conn, user["id"])
    finally:
        await conn.close()
    claims = _claims(
        config, user, session_id, method="password", expires_in=expires_in, operator=operator
    )
    return sign_token(config, claims, algorithm=algorithm, kid=kid)
