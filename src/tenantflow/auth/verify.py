"""Verification of Supabase access tokens: the first half of the tenant guard.

`verify_access_token()` composes the rooms of this package, and accepts a token only when
every check passes, in this order:

1. size (`AUTH_MAX_TOKEN_BYTES`) and shape: three base64url segments, JSON header and payload
   (`tokens.parse_token`);
2. header: `typ`, if present, is `JWT`; no `crit`; `alg` is ES256, RS256 or HS256 (`none` and
   everything else refused). `jku`, `x5u`, `jwk` and `x5c` play no part: keys come only from
   `SUPABASE_URL/auth/v1/.well-known/jwks.json` (`tokens.check_header`);
3. signature:
   - ES256/RS256: the key named by `kid` in the project's JWKS. The key alone decides the
     algorithm (EC P-256 → ES256, RSA ≥ 2048 bits → RS256, the JWK's `alg` if it says so);
     a token whose `alg` differs is refused. The JWKS is cached at most `AUTH_JWKS_CACHE_S`
     (≤ 600 s), refetched once for an unknown `kid`, and never more often than every
     `AUTH_JWKS_MIN_REFETCH_INTERVAL_S` for unknown kids or after a failure; concurrent
     callers share one fetch (`jwks.JwksCache`);
   - HS256 (legacy projects): locally with `SUPABASE_JWT_SECRET` when it is set, otherwise
     Supabase Auth itself is asked (`GET /auth/v1/user`, supabase-py's `auth.get_user`), after
     the claim checks below have been run on the still unverified payload so that plainly bad
     tokens never cost a call;
4. claims, by this package and not by a library: not an API key (`anon`/`service_role` key
   without `sub`), `exp`/`nbf`/`iat` with `AUTH_LEEWAY_S`, `iss == SUPABASE_URL + "/auth/v1"`,
   `aud` is `authenticated`, `role == "authenticated"`, `sub` a UUID, `is_anonymous` refused
   unless the caller allows it (`tokens.check_claims`);
5. `AUTH_STRICT` (or `strict=True`): Supabase Auth is asked on top of a local check, so a
   signed-out session or a deleted user is refused (`supabase.ask_supabase_auth`).

Every refusal is an `AuthError` subclass whose message is safe to show an operator: it never
holds the token, the JWT secret or the API key, and values read from a token are shown only
when short and harmless. Exceptions are raised without their cause chain, since a cause
(an httpx error, a decoding error) can carry the request or the token's bytes.

The token travels as a `SecretStr` down to the one step that needs its characters (parsing,
or the request to Supabase Auth), which alone unwraps it.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from tenantflow.auth.errors import UnknownSigningKey
from tenantflow.auth.jwks import JwksCache
from tenantflow.auth.supabase import ask_supabase_auth
from tenantflow.auth.tokens import (
    ASYMMETRIC_ALGORITHMS,
    Algorithm,
    app_metadata_grants_operator,
    check_claims,
    check_header,
    check_hs256_signature,
    check_signature,
    parse_token,
)
from tenantflow.settings import Settings, get_settings

__all__ = [
    "DEFAULT_JWKS_CACHE",
    "VerifiedClaims",
    "clear_jwks_cache",
    "verify_access_token",
]

#: The process's key sets, used by `verify_access_token()` unless it is given another cache.
DEFAULT_JWKS_CACHE: Final = JwksCache()


class VerifiedClaims(BaseModel):
    """The claims of an accepted token. `claims` is the whole verified payload, as Supabase
    passes it to PostgREST in `request.jwt.claims`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sub: UUID
    role: str
    email: str | None = None
    phone: str | None = None
    aal: str | None = None
    session_id: UUID | None = None
    is_anonymous: bool = False
    app_metadata: dict[str, Any] = Field(default_factory=dict)
    user_metadata: dict[str, Any] = Field(default_factory=dict, repr=False)
    issued_at: datetime
    expires_at: datetime
    algorithm: Algorithm
    key_id: str | None = None
    checked_with_auth: bool = Field(
        default=False, description="Supabase Auth confirmed the user and session."
    )
    claims: dict[str, Any] = Field(repr=False)

    @property
    def user_id(self) -> UUID:
        return self.sub

    @property
    def token_grants_operator(self) -> bool:
        """The token says operator. Stale until the token refreshes: confirm against
        `auth.users.raw_app_meta_data` with `app_metadata_grants_operator()`."""
        return app_metadata_grants_operator(self.app_metadata)

    def claims_json(self) -> str:
        """The verified claims as JSON, for `set_config('request.jwt.claims', ..., true)`."""
        return json.dumps(self.claims, separators=(",", ":"), sort_keys=True)


def clear_jwks_cache(settings: Settings | None = None) -> None:
    """Forget every key set of the default cache, in memory and in the cache folder of
    `settings` (default: the process settings, if they load). For tests, or after a key
    rotation."""
    DEFAULT_JWKS_CACHE.clear(settings)


async def verify_access_token(
    token: SecretStr | str,
    *,
    settings: Settings | None = None,
    allow_anonymous: bool = False,
    strict: bool | None = None,
    jwks: JwksCache | None = None,
) -> VerifiedClaims:
    """Verify a Supabase access token and return its claims (see the module docstring).

    Args:
        token: the bare access token (no `Bearer ` prefix).
        settings: defaults to `get_settings()`.
        allow_anonymous: accept tokens of anonymous sign-ins (`is_anonymous: true`).
        strict: ask Supabase Auth on top of a local check; defaults to `AUTH_STRICT`.
        jwks: where the signing keys come from; defaults to `DEFAULT_JWKS_CACHE`.

    Raises:
        AuthError: one subclass per reason; never retried by callers, except
            `AuthServiceUnavailable`, which is transient.
    """
    settings = settings or get_settings()
    jwks = jwks or DEFAULT_JWKS_CACHE
    # NOTE: kept wrapped; only `parse_token` and `ask_supabase_auth` unwrap it, where the
    # characters are needed.
    secret = token if isinstance(token, SecretStr) else SecretStr(token)
    strict = settings.auth_strict if strict is None else strict
    parsed = parse_token(secret, settings.auth_max_token_bytes)
    algorithm = check_header(parsed.header)
    kid = parsed.header.get("kid")
    payload = parsed.payload
    asked_auth = False

    def check_claims_now() -> None:
        check_claims(
            payload,
            issuer=f"{settings.supabase_url}/auth/v1",
            leeway_s=settings.auth_leeway_s,
            allow_anonymous=allow_anonymous,
            now=time.time(),
        )

    if algorithm in ASYMMETRIC_ALGORITHMS:
        if not isinstance(kid, str) or not kid:
            raise UnknownSigningKey("token names no signing key (kid)")
        check_signature(parsed, algorithm, await jwks.signing_key(settings, kid))
        check_claims_now()
    elif settings.supabase_jwt_secret is not None:
        check_hs256_signature(parsed, settings.supabase_jwt_secret.get_secret_value().encode())
        check_claims_now()
    else:
        # NOTE: refuse plainly bad tokens before spending a call; acceptance needs Auth's word.
        check_claims_now()
        await ask_supabase_auth(secret, payload["sub"], settings)
        asked_auth = True

    if strict and not asked_auth:
        await ask_supabase_auth(secret, payload["sub"], settings)
        asked_auth = True

    return _verified(payload, algorithm, kid if isinstance(kid, str) else None, asked_auth)


def _verified(
    payload: dict[str, Any], algorithm: Algorithm, kid: str | None, asked_auth: bool
) -> VerifiedClaims:
    session_id = payload.get("session_id")
    return VerifiedClaims(
        sub=UUID(payload["sub"]),
        role=payload["role"],
        email=payload.get("email") or None,
        phone=payload.get("phone") or None,
        aal=payload.get("aal"),
        session_id=UUID(session_id) if session_id else None,
        is_anonymous=payload.get("is_anonymous", False),
        app_metadata=payload.get("app_metadata") or {},
        user_metadata=payload.get("user_metadata") or {},
        issued_at=datetime.fromtimestamp(payload["iat"], UTC),
        expires_at=datetime.fromtimestamp(payload["exp"], UTC),
        algorithm=algorithm,
        key_id=kid,
        checked_with_auth=asked_auth,
        claims=payload,
    )
