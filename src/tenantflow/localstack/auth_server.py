"""A local stand-in for Supabase Auth, speaking the same HTTP contract as the real one.

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

Keys live in `<stack>/auth/keys.json` (0600): ES256 (P-256) or RS256 keys, each with a `kid`, one
of them current for minting. The server re-reads the file on every request, so tests rotate keys
with `add_signing_key()` / `remove_signing_key()` while it runs. Legacy HS256 tokens are signed
with the stack's JWT secret (`StackSecrets.jwt_secret`), which also signs the anon and
service-role API keys, as on a Supabase project with legacy keys.

Like GoTrue on Supabase, the stand-in owns its own table, `auth.sessions`, and creates it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tenantflow.auth import OPERATOR_APP_METADATA_KEY, OPERATOR_ROLE
from tenantflow.errors import TenantflowError
from tenantflow.localstack.config import StackConfig
from tenantflow.localstack.services import (
    HttpProcessService,
    StackError,
)

__all__ = [
    "AuthServer",
    "SigningKey",
    "UnknownUser",
    "add_signing_key",
    "create_app",
    "create_user",
    "delete_user",
    "ensure_auth_schema",
    "ensure_signing_keys",
    "load_signing_keys",
    "mint_access_token",
    "remove_signing_key",
    "set_operator",
    "sign_token",
]

log = logging.getLogger("tenantflow.stack")

KeyAlgorithm = Literal["ES256", "RS256"]
TokenAlgorithm = Literal["ES256", "RS256", "HS256"]

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

_USER_COLUMNS = """
    id, aud, role, email, phone, email_confirmed_at, last_sign_in_at,
    raw_app_meta_data::text AS app_metadata, raw_user_meta_data::text AS user_metadata,
    is_anonymous, created_at, updated_at
"""


class UnknownUser(TenantflowError, LookupError):
    """No user with this email in `auth.users`."""


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: KeyAlgorithm
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    def public_jwk(self) -> dict[str, Any]:
        """The public half, shaped like Supabase's JWKS entries."""
        public = self.private_key.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        return {
            **jwk,
            "kid": self.kid,
            "alg": self.algorithm,
            "use": "sig",
            "key_ops": ["verify"],
            "ext": True,
        }


def _keys_file(config: StackConfig) -> Path:
    return config.stack_dir / "auth" / "keys.json"


@contextlib.contextmanager
def _locked_keys(config: StackConfig) -> Iterator[dict[str, Any]]:
    """Read-modify-write of the keys file under an exclusive lock; written atomically."""
    path = _keys_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict[str, Any] = (
            json.loads(path.read_text()) if path.exists() else {"current": None, "keys": []}
        )
        yield data
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(temporary, path)


def _new_private_key(algorithm: KeyAlgorithm) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def add_signing_key(
    config: StackConfig, algorithm: KeyAlgorithm = "ES256", *, current: bool = False
) -> str:
    """Generate a key, publish it in the JWKS and return its `kid`.

    `current=True` also makes it the key that mints new tokens (a rotation); otherwise it is a
    published standby key, as Supabase publishes a key before it starts signing with it.
    """
    kid = str(uuid.uuid4())
    with _locked_keys(config) as data:
        data["keys"].append(
            {"kid": kid, "alg": algorithm, "private_pem": _pem(_new_private_key(algorithm))}
        )
        if current or not data.get("current"):
            data["current"] = kid
    return kid


def remove_signing_key(config: StackConfig, kid: str) -> None:
    """Unpublish a key (a revocation). The current key cannot be removed."""
    with _locked_keys(config) as data:
        if data.get("current") == kid:
            raise StackError(f"signing key {kid} is the current one; make another current first")
        data["keys"] = [entry for entry in data["keys"] if entry["kid"] != kid]


def ensure_signing_keys(config: StackConfig) -> None:
    """Create the stack's first ES256 key if it has none."""
    path = _keys_file(config)
    if path.exists() and json.loads(path.read_text()).get("current"):
        return
    with _locked_keys(config) as data:
        if not data.get("current"):
            kid = str(uuid.uuid4())
            data["keys"].append(
                {"kid": kid, "alg": "ES256", "private_pem": _pem(_new_private_key("ES256"))}
            )
            data["current"] = kid


def load_signing_keys(config: StackConfig) -> tuple[dict[str, SigningKey], str]:
    """All published keys by `kid`, and the current key's `kid`."""
    data = json.loads(_keys_file(config).read_text())
    keys: dict[str, SigningKey] = {}
    for entry in data["keys"]:
        private = serialization.load_pem_private_key(entry["private_pem"].encode(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise StackError(f"signing key {entry['kid']} has an unsupported type")
        keys[entry["kid"]] = SigningKey(entry["kid"], entry["alg"], private)
    return keys, data["current"]


def sign_token(
    config: StackConfig,
    claims: Mapping[str, Any],
    *,
    algorithm: TokenAlgorithm = "ES256",
    kid: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Sign `claims` as Supabase Auth would: with the current (or the named) asymmetric key and
    its `kid` in the header, or, for `HS256`, with the stack's legacy JWT secret."""
    if algorithm == "HS256":
        return jwt.encode(
            dict(claims), config.secrets.jwt_secret, algorithm="HS256", headers=dict(headers or {})
        )
    keys, current = load_signing_keys(config)
    key = keys[kid or current]
    return jwt.encode(
        dict(claims),
        key.private_key,
        algorithm=key.algorithm,
        headers={"kid": key.kid, "typ": "JWT", **(headers or {})},
    )


# --------------------------------------------------------------------------- users and tokens


async def _admin_connection(config: StackConfig) -> asyncpg.Connection:
    return await asyncpg.connect(**config.connect_parts(config.pg_port, admin=True))


async def ensure_auth_schema(config: StackConfig, conn: asyncpg.Connection | None = None) -> None:
    """Create `auth.sessions` (the stand-in's own table, as GoTrue owns it on Supabase)."""
    own = conn is None
    conn = conn or await _admin_connection(config)
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
    conn = conn or await _admin_connection(config)
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
    conn = await _admin_connection(config)
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
    conn = await _admin_connection(config)
    try:
        status = await conn.execute("DELETE FROM auth.users WHERE email = lower($1)", email)
    finally:
        await conn.close()
    return bool(status != "DELETE 0")


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
    conn = await _admin_connection(config)
    try:
        await ensure_auth_schema(config, conn)
        user = await conn.fetchrow(
            f"SELECT {_USER_COLUMNS} FROM auth.users WHERE email = lower($1)",  # noqa: S608
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


# --------------------------------------------------------------------------- HTTP server


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
                f"SELECT {_USER_COLUMNS} FROM auth.users WHERE id = $1",  # noqa: S608
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


class AuthServer(HttpProcessService):
    """The stand-in as a stack service: one uvicorn process on `SUPABASE_URL`'s port."""

    name = "supabase-auth"
    what = "the Auth stand-in"
    folder = "auth"
    port_variable = "TENANTFLOW_AUTH_PORT"

    @property
    def port(self) -> int:
        return self.config.auth_port

    @property
    def address(self) -> str:
        return self.config.supabase_url

    def argv(self) -> list[str]:
        # NOTE: not `-m`: the package imports this module, and runpy warns about that.
        return [sys.executable, "-c", "from tenantflow.localstack.auth_server import main; main()"]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.config.location_environment()}

    def answers(self) -> bool:
        return _answers(self.config.supabase_url)

    def prepare(self) -> None:
        super().prepare()
        self.root.chmod(0o700)
        ensure_signing_keys(self.config)

        async def auth_schema() -> None:
            conn = await _admin_connection(self.config)
            try:
                await ensure_auth_schema(self.config, conn)
            finally:
                await conn.close()

        asyncio.run(auth_schema())


def _answers(supabase_url: str) -> bool:
    try:
        response = httpx.get(f"{supabase_url}/auth/v1/health", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


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
