"""Signing a user in: a session in `auth.sessions` and the access token GoTrue would mint."""

from __future__ import annotations

import json
import time
import uuid

from tenantflow.auth import OPERATOR_APP_METADATA_KEY, OPERATOR_ROLE
from tenantflow_dev.auth_stand_in.keys import TokenAlgorithm, sign_token
from tenantflow_dev.auth_stand_in.users import (
    USER_COLUMNS,
    UnknownUser,
    admin_connection,
    ensure_auth_schema,
)
from tenantflow_dev.config import StackConfig

__all__ = ["mint_access_token"]


async def mint_access_token(
    config: StackConfig,
    email: str,
    *,
    operator: bool = False,
    expires_in: int = 3600,
    algorithm: TokenAlgorithm = "ES256",
    kid: str | None = None,
) -> str:
    """Sign a user in: create a session and mint the access token Supabase Auth would issue.

    The claims are GoTrue's (`iss`, `sub`, `aud`, `exp`, `iat`, `email`, `phone`,
    `app_metadata`, `user_metadata`, `role`, `aal`, `amr`, `session_id`, `is_anonymous`), read
    from the user's row. `operator=True` puts the operator grant into the token's
    `app_metadata` even when `auth.users` no longer has it, as a token issued before a revocation
    would carry it.

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
        session_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO auth.sessions (id, user_id, aal) VALUES ($1, $2, 'aal1')",
            session_id,
            user["id"],
        )
    finally:
        await conn.close()
    app_metadata = json.loads(user["app_metadata"] or "{}")
    if operator:
        roles = app_metadata.get(OPERATOR_APP_METADATA_KEY) or []
        app_metadata[OPERATOR_APP_METADATA_KEY] = [*roles, OPERATOR_ROLE]
    now = int(time.time())
    claims = {
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
        "amr": [{"method": "anonymous" if user["is_anonymous"] else "password", "timestamp": now}],
        "session_id": str(session_id),
        "is_anonymous": bool(user["is_anonymous"]),
    }
    return sign_token(config, claims, algorithm=algorithm, kid=kid)
