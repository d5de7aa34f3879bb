"""The stand-in's HTTP application: Supabase Auth's contract, served by uvicorn.

Served endpoints (the subset tenantflow uses, with Supabase's request and response shapes):
* `GET /auth/v1/.well-known/jwks.json` — the public signing keys (no `apikey` needed, as on
  Supabase); never a symmetric key.
* `GET /auth/v1/user` — `apikey` header (or query parameter) must be the stack's anon or
  service-role key, else the API gateway's 401 (`{"message": "No API key found in request",
  ...}`); `Authorization: Bearer <access token>`, verified like GoTrue does (the key named by
  `kid`, or the legacy HS256 secret), then the user is looked up in `auth.users` and the session
  in `auth.sessions`. Errors use GoTrue's bodies: `{"code": 403, "error_code": "bad_jwt",
  "msg": ...}`, or `{"code": "bad_jwt", "message": ...}` when the client sends
  `X-Supabase-Api-Version: 2024-01-01` (supabase-py does).
* `POST /auth/v1/logout?scope=global|local|others` — signs sessions out (204).
* `GET /auth/v1/health`, and `GET /__stand-in/stats` (request counters, for tests).


`main()` serves the app for the stack named by the TENANTFLOW_* environment; `AuthServer`
(`tenantflow_dev.auth_stand_in.service`) runs it as a stack service.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import date, datetime
from typing import Any

import asyncpg
import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tenantflow.errors import TenantflowError
from tenantflow_dev.auth_stand_in.keys import load_signing_keys
from tenantflow_dev.auth_stand_in.users import USER_COLUMNS, ensure_auth_schema
from tenantflow_dev.config import StackConfig

__all__ = ["create_app", "main"]


class _Refusal(TenantflowError):
    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message


def _rfc3339(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _user_json(row: asyncpg.Record) -> dict[str, Any]:
    """GoTrue's user object (fields with `omitempty` left out when empty)."""
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


class _StandIn:
    """State of one stand-in process: its config, counters and (lazy) database pool."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.counts = {"jwks": 0, "user": 0, "logout": 0}
        self._pool: asyncpg.Pool | None = None

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                **self.config.connect_parts(self.config.pg_port, admin=True),
                min_size=0,
                max_size=4,
            )
        return self._pool

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
