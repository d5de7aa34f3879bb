"""The stand-in's HTTP application: Supabase Auth's contract, served by uvicorn.

Served endpoints (the subset tenantflow uses, with GoTrue's request and response shapes, so
supabase-py's Auth client works unchanged and raises the typed errors it raises on Supabase).
Every endpoint but the JWKS and health wants the `apikey` header (or query parameter) to be
the stack's anon or service-role key, else the API gateway's 401 (`{"message": "No API key
found in request", ...}`). Errors use GoTrue's bodies: `{"code": 400, "error_code":
"invalid_credentials", "msg": ...}`, or `{"code": "invalid_credentials", "message": ...}`
when the client sends `X-Supabase-Api-Version: 2024-01-01` (supabase-py does).

* `GET /auth/v1/.well-known/jwks.json` — the public signing keys (no `apikey` needed, as on
  Supabase); never a symmetric key.
* `POST /auth/v1/token?grant_type=password` `{email, password}` — a session (`access_token`,
  `token_type`, `expires_in`, `expires_at`, `refresh_token`, `user`); a wrong password and an
  unknown email alike: 400 `invalid_credentials`; an unconfirmed email: 400
  `email_not_confirmed`.
* `POST /auth/v1/token?grant_type=refresh_token` `{refresh_token}` — a new session; the used
  token is accepted again within the reuse interval only, then 400
  `refresh_token_already_used` (and the session's tokens are revoked); an unknown one, or one
  of a signed-out session: 400 `refresh_token_not_found` (`tokens.refresh_session`).
* `POST /auth/v1/otp` `{email, create_user}` — 200 `{}`; a 6-digit code goes to the user's
  mailbox file (`mailbox`); an unknown email with `create_user: false`: 422 `otp_disabled`.
* `POST /auth/v1/verify` `{type: "email"|"magiclink", email, token}` — a session; a wrong,
  used or expired code: 403 `otp_expired`.
* `GET /auth/v1/user` — `Authorization: Bearer <access token>`, verified like GoTrue does
  (the key named by `kid`, or the legacy HS256 secret), then the user is looked up in
  `auth.users` and the session in `auth.sessions` (403 `session_not_found` once signed out).
* `POST /auth/v1/logout?scope=global|local|others` — signs sessions out (204): their
  sessions and refresh tokens go; access tokens already issued stay valid until they expire
  for anyone who checks only their signature.
* Admin (`Authorization: Bearer <service-role key>`, else 403 `not_admin`):
  `GET /auth/v1/admin/users?page=&per_page=` (`{"users": [...], "aud": ...}`, `X-Total-Count`
  and `Link` headers), `POST /auth/v1/admin/users`, `GET|PUT|DELETE /auth/v1/admin/users/{id}`
  (`PUT` merges `app_metadata` and `user_metadata` key by key, a `null` deleting the key).
* `GET /auth/v1/health`, and `GET /__stand-in/stats` (request counters, for tests).

`main()` serves the app for the stack named by the TENANTFLOW_* environment; `AuthServer`
(`tenantflow_dev.auth_stand_in.service`) runs it as a stack service.
"""

from __future__ import annotations

import argparse
import functools
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import date
from typing import Any

import asyncpg
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tenantflow_dev.auth_stand_in.keys import load_signing_keys
from tenantflow_dev.auth_stand_in.mailbox import consume_one_time_code, send_one_time_code
from tenantflow_dev.auth_stand_in.tokens import refresh_session, start_session
from tenantflow_dev.auth_stand_in.users import (
    USER_COLUMNS,
    AuthRefusal,
    ensure_auth_schema,
    hash_password,
    password_matches,
    user_json,
)
from tenantflow_dev.config import StackConfig

__all__ = ["create_app", "main"]

_Refusal = AuthRefusal
_user_json = user_json

#: The roles GoTrue's admin API accepts (GOTRUE_JWT_ADMIN_ROLES).
_ADMIN_ROLES = ("service_role", "supabase_admin")
_INVALID_CREDENTIALS = ("invalid_credentials", "Invalid login credentials")


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the email is unknown (`_password_grant`)."""
    return hash_password(uuid.uuid4().hex)


class _StandIn:
    """State of one stand-in process: its config, counters and (lazy) database pool."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.counts = {
            "jwks": 0,
            "user": 0,
            "logout": 0,
            "token": 0,
            "otp": 0,
            "verify": 0,
            "admin": 0,
        }
        self._schema_ready = False
        self._pool: asyncpg.Pool | None = None

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                **self.config.connect_parts(self.config.pg_port, admin=True),
                min_size=0,
                max_size=4,
            )
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, the stand-in's own tables made sure of."""
        pool = await self.pool()
        async with pool.acquire() as conn:
            if not self._schema_ready:
                await ensure_auth_schema(self.config, conn)
                self._schema_ready = True
            yield conn

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    # -- the API gateway's key check ------------------------------------------------------

    def gateway_refusal(self, request: Request) -> Response | None:
        key = request.headers.get("apikey") or request.query_params.get("apikey")
        if not key:
            return JSONResponse(
                {
                    "message": "No API key found in request",
                    "hint": "No `apikey` request header or url param was found.",
                },
                status_code=401,
            )
        secrets = self.config.secrets
        if key not in (secrets.anon_key, secrets.service_role_key):
            return JSONResponse(
                {
                    "message": "Invalid API key",
                    "hint": "Double check your Supabase `anon` or `service_role` API key.",
                },
                status_code=401,
            )
        return None

    # -- GoTrue's requireAuthentication ---------------------------------------------------

    def claims(self, request: Request) -> dict[str, Any]:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refusal(401, "no_authorization", "This endpoint requires a Bearer token")
        try:
            return self._decode(token.strip())
        except (jwt.PyJWTError, KeyError, ValueError) as error:
            raise _Refusal(
                403, "bad_jwt", f"invalid JWT: unable to parse or verify signature, {error}"
            ) from None

    def _decode(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        key: Any
        if alg == "HS256":
            key, algorithms = self.config.secrets.jwt_secret, ["HS256"]
        elif isinstance(kid, str):
            keys, _ = load_signing_keys(self.config)
            if kid not in keys:
                raise jwt.InvalidKeyError("token is unverifiable: invalid kid")
            key, algorithms = keys[kid].private_key.public_key(), [keys[kid].algorithm]
        else:
            raise jwt.InvalidKeyError("token is unverifiable: missing kid")
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            options={"verify_aud": False, "require": ["exp"]},
        )
        return claims

    def require_admin(self, request: Request) -> dict[str, Any]:
        """GoTrue's requireAdmin: a verified token whose `role` is an admin role."""
        claims = self.claims(request)
        if claims.get("role") not in _ADMIN_ROLES:
            raise _Refusal(403, "not_admin", "User not allowed")
        return claims

    async def user_and_session(
        self, claims: Mapping[str, Any]
    ) -> tuple[asyncpg.Record, uuid.UUID | None]:
        sub = claims.get("sub")
        if not sub:
            raise _Refusal(403, "bad_jwt", "invalid claim: missing sub claim")
        try:
            user_id = uuid.UUID(str(sub))
        except ValueError:
            raise _Refusal(400, "bad_jwt", "invalid claim: sub claim must be a UUID") from None
        pool = await self.pool()
        async with pool.acquire() as conn:
            await ensure_auth_schema(self.config, conn)
            user = await conn.fetchrow(
                f"SELECT {USER_COLUMNS} FROM auth.users WHERE id = $1",  # noqa: S608
                user_id,
            )
            if user is None:
                raise _Refusal(403, "user_not_found", "User from sub claim in JWT does not exist")
            session_id = claims.get("session_id")
            if not session_id or session_id == str(uuid.UUID(int=0)):
                return user, None
            try:
                session = uuid.UUID(str(session_id))
            except ValueError:
                raise _Refusal(
                    403, "bad_jwt", "invalid claim: session_id claim must be a UUID"
                ) from None
            found = await conn.fetchval(
                "SELECT 1 FROM auth.sessions WHERE id = $1 AND user_id = $2 "
                "AND (not_after IS NULL OR not_after > now())",
                session,
                user_id,
            )
            if found is None:
                raise _Refusal(
                    403, "session_not_found", "Session from session_id claim in JWT does not exist"
                )
            return user, session


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or GoTrue's 400 `bad_json`."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as error:
        raise _Refusal(400, "bad_json", f"Could not parse request body as JSON: {error}") from None
    if not isinstance(body, dict):
        raise _Refusal(400, "bad_json", "Could not parse request body as JSON: not an object")
    return body


def _email_of(body: Mapping[str, Any]) -> str:
    email = body.get("email")
    return email.strip().lower() if isinstance(email, str) else ""


def _merged(current: Mapping[str, Any], changes: Any) -> dict[str, Any]:
    """GoTrue's metadata update: key by key, a `null` value deleting the key."""
    if not isinstance(changes, dict):
        raise _Refusal(400, "validation_failed", "metadata must be a JSON object")
    merged = dict(current)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


async def _user_id_of(conn: asyncpg.Connection, email: str) -> uuid.UUID | None:
    """The id of the (non-SSO) user with this email, as GoTrue finds users by email."""
    found: uuid.UUID | None = await conn.fetchval(
        "SELECT id FROM auth.users WHERE email = $1 AND NOT is_sso_user", email
    )
    return found


def _query_int(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise _Refusal(400, "validation_failed", f"Bad Pagination Parameters: {name}") from None


def _user_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["user_id"])
    except ValueError:
        raise _Refusal(404, "user_not_found", "User not found") from None


def _api_version(request: Request) -> date | None:
    try:
        return date.fromisoformat(request.headers.get("x-supabase-api-version", ""))
    except ValueError:
        return None


def _error(request: Request, refusal: _Refusal) -> Response:
    """GoTrue's error body: the 2024-01-01 shape when the client asks for it."""
    version = _api_version(request)
    if version is not None and version >= date(2024, 1, 1):
        return JSONResponse(
            {"code": refusal.error_code, "message": refusal.message},
            status_code=refusal.status,
            headers={"X-Supabase-Api-Version": "2024-01-01"},
        )
    return JSONResponse(
        {"code": refusal.status, "error_code": refusal.error_code, "msg": refusal.message},
        status_code=refusal.status,
    )


def create_app(config: StackConfig) -> Starlette:
    """The stand-in's ASGI application."""
    stand_in = _StandIn(config)

    async def jwks(request: Request) -> Response:
        stand_in.counts["jwks"] += 1
        keys, _ = load_signing_keys(config)
        return JSONResponse(
            {"keys": [key.public_jwk() for key in keys.values()]},
            headers={"Cache-Control": "public, max-age=600"},
        )

    async def user(request: Request) -> Response:
        stand_in.counts["user"] += 1
        if (refused := stand_in.gateway_refusal(request)) is not None:
            return refused
        try:
            row, _ = await stand_in.user_and_session(stand_in.claims(request))
        except _Refusal as refusal:
            return _error(request, refusal)
        return JSONResponse(_user_json(row))

    async def logout(request: Request) -> Response:
        stand_in.counts["logout"] += 1
        if (refused := stand_in.gateway_refusal(request)) is not None:
            return refused
        scope = request.query_params.get("scope", "global")
        if scope not in ("global", "local", "others"):
            return _error(request, _Refusal(400, "validation_failed", "Unsupported logout scope"))
        try:
            row, session = await stand_in.user_and_session(stand_in.claims(request))
        except _Refusal as refusal:
            return _error(request, refusal)
        pool = await stand_in.pool()
        async with pool.acquire() as conn:
            if scope == "local":
                await conn.execute("DELETE FROM auth.sessions WHERE id = $1", session)
            elif scope == "others":
                await conn.execute(
                    "DELETE FROM auth.sessions WHERE user_id = $1 AND id IS DISTINCT FROM $2",
                    row["id"],
                    session,
                )
            else:
                await conn.execute("DELETE FROM auth.sessions WHERE user_id = $1", row["id"])
        return Response(status_code=204)

    async def token(request: Request) -> Response:
        stand_in.counts["token"] += 1
        if (refused := stand_in.gateway_refusal(request)) is not None:
            return refused
        grant_type = request.query_params.get("grant_type", "")
        try:
            body = await _json_body(request)
            async with stand_in.connection() as conn:
                if grant_type == "password":
                    session = await _password_grant(conn, body)
                elif grant_type == "refresh_token":
                    refresh_token = body.get("refresh_token")
                    if not isinstance(refresh_token, str) or not refresh_token:
                        raise _Refusal(400, "refresh_token_not_found", "Refresh Token Not Found")
                    session = await refresh_session(config, conn, refresh_token)
                else:
                    raise _Refusal(400, "unsupported_grant_type", "unsupported_grant_type")
        except _Refusal as refusal:
            return _error(request, refusal)
        return JSONResponse(session)

    async def _password_grant(conn: asyncpg.Connection, body: Mapping[str, Any]) -> dict[str, Any]:
        email, password = _email_of(body), body.get("password")
        if not email or not isinstance(password, str) or not password:
            raise _Refusal(400, *_INVALID_CREDENTIALS)
        row = await conn.fetchrow(
            "SELECT id, encrypted_password, email_confirmed_at, banned_until > now() AS banned "
            "FROM auth.users WHERE email = $1 AND NOT is_sso_user",
            email,
        )
        # NOTE: an unknown email costs a hash too, so timing tells no more than the answer.
        matches = password_matches(
            password, row["encrypted_password"] if row is not None else _dummy_hash()
        )
        if row is None or not matches:
            raise _Refusal(400, *_INVALID_CREDENTIALS)
        if row["email_confirmed_at"] is None:
            raise _Refusal(400, "email_not_confirmed", "Email not confirmed")
        if row["banned"]:
            raise _Refusal(400, "user_banned", "User is banned")
        return await start_session(config, conn, row["id"], method="password")

    async def otp(request: Request) -> Response:
        stand_in.counts["otp"] += 1
        if (refused := stand_in.gateway_refusal(request)) is not None:
            return refused
        try:
            body = await _json_body(request)
            email = _email_of(body)
            if not email:
                raise _Refusal(
                    422, "validation_failed", "An email address or phone number is required"
                )
            async with stand_in.connection() as conn:
                user_id = await _user_id_of(conn, email)
                if user_id is None:
                    if body.get("create_user", True) is False:
                        raise _Refusal(422, "otp_disabled", "Signups not allowed for otp")
                    user_id = await _sign_up(conn, email, body.get("data"))
                await send_one_time_code(config, conn, user_id, email)
        except _Refusal as refusal:
            return _error(request, refusal)
        return JSONResponse({})

    async def _sign_up(conn: asyncpg.Connection, email: str, data: Any) -> uuid.UUID:
        """An email sign-up by one-time code: unconfirmed until the code is verified."""
        user_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO auth.users (instance_id, id, aud, role, email, raw_app_meta_data, "
            "raw_user_meta_data) VALUES ('00000000-0000-0000-0000-000000000000', $1, "
            "'authenticated', 'authenticated', $2, $3::jsonb, $4::jsonb) "
            "ON CONFLICT DO NOTHING",
            user_id,
            email,
            json.dumps({"provider": "email", "providers": ["email"]}),
            json.dumps(data if isinstance(data, dict) else {}),
        )
        found = await _user_id_of(conn, email)
        assert found is not None  # noqa: S101 - inserted just now, or there already
        return found

    async def verify(request: Request) -> Response:
        stand_in.counts["verify"] += 1
        if (refused := stand_in.gateway_refusal(request)) is not None:
            return refused
        try:
            body = await _json_body(request)
            if body.get("type") not in ("email", "magiclink", "signup"):
                raise _Refusal(400, "validation_failed", "Unsupported verification type")
            email, code = _email_of(body), body.get("token")
            if not email or not isinstance(code, str) or not code:
                raise _Refusal(
                    422,
                    "validation_failed",
                    "Only an email address or phone number should be provided on verify",
                )
            async with stand_in.connection() as conn:
                user_id = await _user_id_of(conn, email)
                if user_id is None:
                    raise _Refusal(403, "otp_expired", "Token has expired or is invalid")
                await consume_one_time_code(config, conn, user_id, email, code)
                await conn.execute(
                    "UPDATE auth.users SET email_confirmed_at = coalesce(email_confirmed_at, "
                    "now()), updated_at = now() WHERE id = $1",
                    user_id,
                )
                session = await start_session(config, conn, user_id, method="otp")
        except _Refusal as refusal:
            return _error(request, refusal)
        return JSONResponse(session)

    async def admin_users(request: Request) -> Response:
        stand_in.counts["admin"] += 1
        if (refused := stand_in.gateway_refusal(request)) is not None:
            return refused
        try:
            stand_in.require_admin(request)
            if request.method == "POST":
                return await _admin_create_user(request)
            page = max(_query_int(request, "page", 1), 1)
            per_page = min(max(_query_int(request, "per_page", 50), 1), 1000)
            async with stand_in.connection() as conn:
                total = await conn.fetchval("SELECT count(*) FROM auth.users")
                rows = await conn.fetch(
                    f"SELECT {USER_COLUMNS} FROM auth.users "  # noqa: S608
                    "ORDER BY created_at DESC, id LIMIT $1 OFFSET $2",
                    per_page,
                    (page - 1) * per_page,
                )
        except _Refusal as refusal:
            return _error(request, refusal)
        last = max((total + per_page - 1) // per_page, 1)
        base = f"{config.supabase_url}/auth/v1/admin/users"
        links = [f'<{base}?page={last}&per_page={per_page}>; rel="last"']
        if page < last:
            links.insert(0, f'<{base}?page={page + 1}&per_page={per_page}>; rel="next"')
        return JSONResponse(
            {"users": [_user_json(row) for row in rows], "aud": "authenticated"},
            headers={"X-Total-Count": str(total), "Link": ", ".join(links)},
        )

    async def _admin_create_user(request: Request) -> Response:
        body = await _json_body(request)
        email, password = _email_of(body), body.get("password")
        if not email:
            raise _Refusal(400, "validation_failed", "Unable to validate email address")
        if password is not None and not isinstance(password, str):
            raise _Refusal(400, "validation_failed", "password must be a string")
        app_metadata = _merged(
            {"provider": "email", "providers": ["email"]}, body.get("app_metadata") or {}
        )
        user_metadata = _merged({}, body.get("user_metadata") or {})
        async with stand_in.connection() as conn:
            row = await conn.fetchrow(
                "INSERT INTO auth.users (instance_id, id, aud, role, email, encrypted_password, "  # noqa: S608
                "email_confirmed_at, raw_app_meta_data, raw_user_meta_data) "
                "VALUES ('00000000-0000-0000-0000-000000000000', $1, 'authenticated', "
                "'authenticated', $2, $3, CASE WHEN $4 THEN now() END, $5::jsonb, $6::jsonb) "
                f"ON CONFLICT DO NOTHING RETURNING {USER_COLUMNS}",
                uuid.uuid4(),
                email,
                hash_password(password) if password else None,
                body.get("email_confirm") is True,
                json.dumps(app_metadata),
                json.dumps(user_metadata),
            )
        if row is None:
            raise _Refusal(
                422, "email_exists", "A user with this email address has already been registered"
            )
        return JSONResponse(_user_json(row))

    async def admin_user(request: Request) -> Response:
        stand_in.counts["admin"] += 1
        if (refused := stand_in.gateway_refusal(request)) is not None:
            return refused
        try:
            stand_in.require_admin(request)
            user_id = _user_id(request)
            body = await _json_body(request) if request.method == "PUT" else {}
            async with stand_in.connection() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"SELECT {USER_COLUMNS} FROM auth.users WHERE id = $1 FOR UPDATE",  # noqa: S608
                    user_id,
                )
                if row is None:
                    raise _Refusal(404, "user_not_found", "User not found")
                if request.method == "DELETE":
                    await conn.execute("DELETE FROM auth.users WHERE id = $1", user_id)
                    return JSONResponse({})
                if request.method == "PUT":
                    row = await _admin_update(conn, row, body)
        except _Refusal as refusal:
            return _error(request, refusal)
        return JSONResponse(_user_json(row))

    async def _admin_update(
        conn: asyncpg.Connection, row: asyncpg.Record, body: Mapping[str, Any]
    ) -> asyncpg.Record:
        app_metadata = json.loads(row["app_metadata"] or "{}")
        user_metadata = json.loads(row["user_metadata"] or "{}")
        if "app_metadata" in body and body["app_metadata"] is not None:
            app_metadata = _merged(app_metadata, body["app_metadata"])
        if "user_metadata" in body and body["user_metadata"] is not None:
            user_metadata = _merged(user_metadata, body["user_metadata"])
        password = body.get("password")
        if password is not None and (not isinstance(password, str) or not password):
            raise _Refusal(400, "validation_failed", "password must be a non-empty string")
        updated: asyncpg.Record = await conn.fetchrow(
            "UPDATE auth.users SET raw_app_meta_data = $2::jsonb, raw_user_meta_data = $3::jsonb,"  # noqa: S608
            " encrypted_password = coalesce($4, encrypted_password),"
            " email_confirmed_at = CASE WHEN $5 THEN coalesce(email_confirmed_at, now())"
            " ELSE email_confirmed_at END, updated_at = now() "
            f"WHERE id = $1 RETURNING {USER_COLUMNS}",
            row["id"],
            json.dumps(app_metadata),
            json.dumps(user_metadata),
            hash_password(password) if password else None,
            body.get("email_confirm") is True,
        )
        return updated

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "version": "tenantflow-stand-in",
                "name": "GoTrue",
                "description": "tenantflow's local stand-in for Supabase Auth",
            }
        )

    async def stats(request: Request) -> Response:
        return JSONResponse(dict(stand_in.counts))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await stand_in.close()

    return Starlette(
        routes=[
            Route("/auth/v1/.well-known/jwks.json", jwks, methods=["GET"]),
            Route("/auth/v1/user", user, methods=["GET"]),
            Route("/auth/v1/token", token, methods=["POST"]),
            Route("/auth/v1/otp", otp, methods=["POST"]),
            Route("/auth/v1/verify", verify, methods=["POST"]),
            Route("/auth/v1/admin/users", admin_users, methods=["GET", "POST"]),
            Route("/auth/v1/admin/users/{user_id}", admin_user, methods=["GET", "PUT", "DELETE"]),
            Route("/auth/v1/logout", logout, methods=["POST"]),
            Route("/auth/v1/health", health, methods=["GET"]),
            Route("/__stand-in/stats", stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


# --------------------------------------------------------------------------- the service


def main(argv: list[str] | None = None) -> None:
    """Serve the stand-in for the stack named by the TENANTFLOW_* environment."""
    import uvicorn

    parser = argparse.ArgumentParser(description="tenantflow's local Supabase Auth stand-in")
    parser.parse_args(argv)
    config = StackConfig.from_env()
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.auth_port,
        log_level="warning",
        access_log=False,
    )
