"""Verification of Supabase access tokens: the first half of the tenant guard.

`verify_access_token()` accepts a token only when every check below passes, in this order:

1. size (`AUTH_MAX_TOKEN_BYTES`) and shape: three base64url segments, JSON header and payload;
2. header: `typ`, if present, is `JWT`; no `crit`; `alg` is ES256, RS256 or HS256 (`none` and
   everything else refused). `jku`, `x5u`, `jwk` and `x5c` play no part: keys come only from
   `SUPABASE_URL/auth/v1/.well-known/jwks.json`;
3. signature:
   - ES256/RS256: the key named by `kid` in the project's JWKS. The key alone decides the
     algorithm (EC P-256 → ES256, RSA ≥ 2048 bits → RS256, the JWK's `alg` if it says so);
     a token whose `alg` differs is refused. The JWKS is cached at most `AUTH_JWKS_CACHE_S`
     (≤ 600 s), refetched once for an unknown `kid`, and never more often than every
     `AUTH_JWKS_MIN_REFETCH_INTERVAL_S` for unknown kids or after a failure; concurrent
     callers share one fetch;
   - HS256 (legacy projects): locally with `SUPABASE_JWT_SECRET` when it is set, otherwise
     Supabase Auth itself is asked (`GET /auth/v1/user`, supabase-py's `auth.get_user`), after
     the claim checks below have been run on the still unverified payload so that plainly bad
     tokens never cost a call;
4. claims, by this module and not by a library: not an API key (`anon`/`service_role` key
   without `sub`), `exp`/`nbf`/`iat` with `AUTH_LEEWAY_S`, `iss == SUPABASE_URL + "/auth/v1"`,
   `aud` is `authenticated`, `role == "authenticated"`, `sub` a UUID, `is_anonymous` refused
   unless the caller allows it;
5. `AUTH_STRICT` (or `strict=True`): Supabase Auth is asked on top of a local check, so a
   signed-out session or a deleted user is refused.

Every refusal is an `AuthError` subclass whose message is safe to show an operator: it never
holds the token, the JWT secret or the API key, and values read from a token are shown only
when short and harmless. Exceptions are raised without their cause chain, since a cause
(an httpx error, a decoding error) can carry the request or the token's bytes.

The JWKS cache is a plain dict guarded by a `threading.Lock`, with no event-loop-bound object
in it: Prefect runs tasks on several loops in several threads, and each HTTP call opens its
own `httpx.AsyncClient`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal
from uuid import UUID

import httpx
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from supabase_auth import AsyncGoTrueClient
from supabase_auth.errors import AuthApiError, AuthRetryableError
from supabase_auth.errors import AuthError as SupabaseAuthError

from tenantflow.errors import TenantflowError
from tenantflow.settings import Settings, get_settings

__all__ = [
    "OPERATOR_APP_METADATA_KEY",
    "OPERATOR_ROLE",
    "AnonymousNotAllowed",
    "ApiKeyUsedAsToken",
    "AuthConfigurationError",
    "AuthError",
    "AuthServiceRejected",
    "AuthServiceUnavailable",
    "BadSignature",
    "DisallowedAlgorithm",
    "InvalidAudience",
    "InvalidIssuer",
    "InvalidRole",
    "InvalidSubject",
    "MalformedToken",
    "SessionNotFound",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenTooLarge",
    "UnknownSigningKey",
    "UserNotFound",
    "VerifiedClaims",
    "app_metadata_grants_operator",
    "clear_jwks_cache",
    "jwks_url",
    "verify_access_token",
]

log = logging.getLogger("tenantflow.auth")

AUDIENCE = "authenticated"
USER_ROLE = "authenticated"
API_KEY_ROLES = frozenset({"anon", "service_role"})
#: The `app_metadata` key that lists a user's tenantflow roles, and the operator's role.
#: Only the service role can write `app_metadata` (users cannot grant it to themselves).
OPERATOR_APP_METADATA_KEY = "roles"
OPERATOR_ROLE = "tenantflow_operator"

Algorithm = Literal["ES256", "RS256", "HS256"]
_ASYMMETRIC: frozenset[str] = frozenset({"ES256", "RS256"})
_MIN_RSA_BITS = 2048
_MAX_JWKS_BYTES = 256 * 1024
_JWT_SEGMENTS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_SHOWABLE = re.compile(r"^[A-Za-z0-9 :/._@+-]{0,100}$")
_NEW_API_KEY_PREFIXES = ("sb_publishable_", "sb_secret_")
_ALGORITHMS = get_default_algorithms()


# --------------------------------------------------------------------------- errors


class AuthError(TenantflowError):
    """A token was refused, or could not be checked. The message is safe for an operator."""

    code: ClassVar[str] = "auth_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class MalformedToken(AuthError):
    """Not a JWT, or one whose header or payload cannot be read."""

    code = "malformed_token"


class TokenTooLarge(AuthError):
    """Longer than `AUTH_MAX_TOKEN_BYTES`; refused before parsing."""

    code = "token_too_large"


class DisallowedAlgorithm(AuthError):
    """`alg` is none, unknown, or not the algorithm of the key that would verify it."""

    code = "disallowed_algorithm"


class UnknownSigningKey(AuthError):
    """No key of the project's JWKS has this token's `kid` (after the allowed refetch)."""

    code = "unknown_signing_key"


class BadSignature(AuthError):
    """The signature does not match the header and payload."""

    code = "bad_signature"


class TokenExpired(AuthError):
    code = "token_expired"


class TokenNotYetValid(AuthError):
    """`nbf` or `iat` lies in the future (beyond the leeway)."""

    code = "token_not_yet_valid"


class InvalidAudience(AuthError):
    code = "invalid_audience"


class InvalidIssuer(AuthError):
    code = "invalid_issuer"


class InvalidRole(AuthError):
    code = "invalid_role"


class ApiKeyUsedAsToken(InvalidRole):
    """A project API key (anon, service_role, publishable or secret) instead of a user's token."""

    code = "api_key_used_as_token"


class InvalidSubject(AuthError):
    """`sub` is missing or not a UUID."""

    code = "invalid_subject"


class AnonymousNotAllowed(AuthError):
    """A token of an anonymous sign-in, where the flow does not allow them."""

    code = "anonymous_not_allowed"


class AuthServiceRejected(AuthError):
    """Supabase Auth refused the token (`error_code` is Auth's, e.g. `bad_jwt`)."""

    code = "auth_service_rejected"

    def __init__(self, message: str, *, error_code: str | None = None, status: int = 0) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,), dict(self.__dict__))


class UserNotFound(AuthServiceRejected):
    """The token's user no longer exists in Supabase Auth."""

    code = "user_not_found"


class SessionNotFound(AuthServiceRejected):
    """The token's session was signed out (or expired) in Supabase Auth."""

    code = "session_not_found"


class AuthServiceUnavailable(AuthError):
    """Supabase Auth could not be reached or answered with a server error: try again later."""

    code = "auth_service_unavailable"


class AuthConfigurationError(AuthError):
    """The worker's own configuration is wrong (e.g. Supabase refuses SUPABASE_ANON_KEY)."""

    code = "auth_configuration_error"


# --------------------------------------------------------------------------- result


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


def app_metadata_grants_operator(app_metadata: Mapping[str, Any] | str | None) -> bool:
    """Whether `app_metadata` (a token's, or `auth.users.raw_app_meta_data` as a mapping or
    JSON text) grants the operator role: `{"roles": [..., "tenantflow_operator", ...]}`."""
    if isinstance(app_metadata, str):
        app_metadata = _json_object(app_metadata.encode())
    if not isinstance(app_metadata, Mapping):
        return False
    roles = app_metadata.get(OPERATOR_APP_METADATA_KEY)
    return isinstance(roles, list) and OPERATOR_ROLE in roles


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _ParsedToken:
    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _safe(value: Any) -> str:
    """A value read from a token, shown only when short and plain (never a token)."""
    if isinstance(value, str) and _SHOWABLE.match(value) and value.count(".") < 2:
        return repr(value)
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    return "<not shown>"


def _b64decode(segment: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _parse(token: str, max_bytes: int) -> _ParsedToken:
    size = len(token.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise TokenTooLarge(
            f"access token is {size} bytes; at most {max_bytes} are accepted (AUTH_MAX_TOKEN_BYTES)"
        )
    if token.startswith(_NEW_API_KEY_PREFIXES):
        raise ApiKeyUsedAsToken(
            "a Supabase API key (sb_publishable_/sb_secret_) was given instead of a user's "
            "access token"
        )
    if token[:7].lower() == "bearer ":
        raise MalformedToken("pass the bare access token, without the 'Bearer ' prefix")
    if not _JWT_SEGMENTS.match(token):
        raise MalformedToken(
            "access token is not a JWT (expected three base64url segments separated by dots)"
        )
    header_b64, payload_b64, signature_b64 = token.split(".")
    header = _json_object(_b64decode(header_b64))
    if header is None:
        raise MalformedToken("access token header is not a base64url-encoded JSON object")
    payload = _json_object(_b64decode(payload_b64))
    if payload is None:
        raise MalformedToken("access token payload is not a base64url-encoded JSON object")
    signature = _b64decode(signature_b64)
    if signature is None:
        raise MalformedToken("access token signature is not base64url")
    return _ParsedToken(
        header=header,
        payload=payload,
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=signature,
    )


def _check_header(header: Mapping[str, Any]) -> Algorithm:
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise MalformedToken(f"token type (typ) {_safe(typ)} is not JWT")
    if "crit" in header:
        raise MalformedToken("tokens with critical header extensions (crit) are not accepted")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise DisallowedAlgorithm("unsigned tokens (alg none or missing) are not accepted")
    if alg not in _ASYMMETRIC and alg != "HS256":
        raise DisallowedAlgorithm(
            f"token algorithm {_safe(alg)} is not accepted (ES256, RS256 or legacy HS256)"
        )
    return alg  # type: ignore[return-value]


def _number(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MalformedToken(f"token's {name} claim is not a number")
    return float(value)


def _required_number(payload: Mapping[str, Any], name: str) -> float:
    value = _number(payload, name)
    if value is None:
        raise MalformedToken(f"token has no {name} claim")
    return value


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _check_claims(
    payload: Mapping[str, Any],
    *,
    settings: Settings,
    allow_anonymous: bool,
    now: float,
) -> None:
    """Every claim, checked here rather than by a library."""
    role = payload.get("role")
    if role in API_KEY_ROLES and "sub" not in payload:
        raise ApiKeyUsedAsToken(
            f"the project's {role} API key was given instead of a user's access token"
        )
    leeway = settings.auth_leeway_s
    exp = _required_number(payload, "exp")
    if now > exp + leeway:
        raise TokenExpired(f"access token expired at {_when(exp)} ({now - exp:.0f} s ago)")
    nbf = _number(payload, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise TokenNotYetValid(f"access token is not valid before {_when(nbf)} (nbf)")
    iat = _required_number(payload, "iat")
    if now + leeway < iat:
        raise TokenNotYetValid(f"access token was issued in the future, at {_when(iat)} (iat)")
    issuer = f"{settings.supabase_url}/auth/v1"
    iss = payload.get("iss")
    if iss != issuer:
        raise InvalidIssuer(f"token issuer (iss) {_safe(iss)} is not {issuer!r}")
    aud = payload.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if AUDIENCE not in audiences or not all(isinstance(a, str) for a in audiences):
        raise InvalidAudience(f"token audience (aud) {_safe(aud)} is not {AUDIENCE!r}")
    if role != USER_ROLE:
        raise InvalidRole(f"token role {_safe(role)} is not {USER_ROLE!r}")
    sub = payload.get("sub")
    if not isinstance(sub, str) or _uuid(sub) is None:
        raise InvalidSubject("token subject (sub) is not a user id (UUID)")
    anonymous = payload.get("is_anonymous", False)
    if not isinstance(anonymous, bool):
        raise MalformedToken("token's is_anonymous claim is not a boolean")
    if anonymous and not allow_anonymous:
        raise AnonymousNotAllowed("tokens of anonymous sign-ins are not accepted here")
    session_id = payload.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or _uuid(session_id) is None):
        raise MalformedToken("token's session_id claim is not a UUID")
    for name in ("app_metadata", "user_metadata"):
        if not isinstance(payload.get(name, {}), dict):
            raise MalformedToken(f"token's {name} claim is not an object")
    for name in ("email", "phone", "aal"):
        if not isinstance(payload.get(name, ""), str):
            raise MalformedToken(f"token's {name} claim is not a string")


def _uuid(value: str) -> UUID | None:
    try:
        return UUID(value)
    except ValueError:
        return None


# --------------------------------------------------------------------------- JWKS cache


@dataclass(frozen=True)
class _VerificationKey:
    kid: str
    algorithm: Algorithm
    key: Any  # a cryptography public key


@dataclass
class _JwksState:
    keys: dict[str, _VerificationKey] | None = None
    fetched_at: float = -math.inf
    attempted_at: float = -math.inf
    last_failed: bool = False
    inflight: concurrent.futures.Future[None] | None = None


# NOTE: keyed by JWKS URL; holds no event-loop-bound object, so any loop in any thread may use
# it. The lock is held only for bookkeeping, never across an await.
_JWKS: dict[str, _JwksState] = {}
_JWKS_LOCK = threading.Lock()


def jwks_url(settings: Settings) -> str:
    return f"{settings.supabase_url}/auth/v1/.well-known/jwks.json"


def clear_jwks_cache(settings: Settings | None = None) -> None:
    """Forget every cached key set, in memory and in the cache folder of `settings`
    (default: the process settings, if they load). For tests, or after a key rotation."""
    with _JWKS_LOCK:
        _JWKS.clear()
    try:
        folder = (settings or get_settings()).auth_jwks_cache_dir
    except Exception:
        return
    if folder is not None:
        for path in folder.glob("jwks-*.json"):
            path.unlink(missing_ok=True)


def _verification_key(jwk: Any) -> _VerificationKey | None:
    """The public key of one JWK and the one algorithm it may verify, or None to skip it."""
    if not isinstance(jwk, dict):
        return None
    kid, kty, alg = jwk.get("kid"), jwk.get("kty"), jwk.get("alg")
    if not isinstance(kid, str) or not kid or jwk.get("use", "sig") != "sig":
        return None
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    try:
        if kty == "EC" and jwk.get("crv") == "P-256" and alg in (None, "ES256"):
            public = {k: jwk[k] for k in ("kty", "crv", "x", "y")}
            return _VerificationKey(kid, "ES256", ECAlgorithm.from_jwk(public))
        if kty == "RSA" and alg in (None, "RS256"):
            key = RSAAlgorithm.from_jwk({k: jwk[k] for k in ("kty", "n", "e")})
            if getattr(key, "key_size", 0) < _MIN_RSA_BITS:
                return None
            return _VerificationKey(kid, "RS256", key)
    except (KeyError, ValueError, TypeError) as error:  # jwt.InvalidKeyError is a ValueError
        log.warning("skipping JWKS key %s: %s", _safe(kid), type(error).__name__)
        return None
    # NOTE: symmetric ("oct") keys are never taken from a JWKS, and unknown types are skipped.
    return None


def _disk_cache(settings: Settings) -> Path | None:
    folder = settings.auth_jwks_cache_dir
    if folder is None:
        return None
    digest = hashlib.sha256(jwks_url(settings).encode()).hexdigest()[:16]
    return folder / f"jwks-{digest}.json"


def _keys_of(document: Mapping[str, Any] | None) -> dict[str, _VerificationKey] | None:
    keys = document.get("keys") if document is not None else None
    if not isinstance(keys, list):
        return None
    parsed = [key for key in map(_verification_key, keys) if key is not None]
    return {key.kid: key for key in parsed}


def _load_disk_cache(settings: Settings) -> tuple[dict[str, _VerificationKey], float] | None:
    """Keys another process of this worker fetched, with their age, if young enough.

    NOTE: the key set is public; the file only spares Supabase Auth a fetch per flow-run
    process, and keeps runs going while Auth is briefly unreachable. It is trusted no
    longer than AUTH_JWKS_CACHE_S, like the memory cache.
    """
    path = _disk_cache(settings)
    try:
        if path is None or path.stat().st_size > _MAX_JWKS_BYTES:
            return None
        document = _json_object(path.read_bytes())
    except OSError:
        return None
    fetched = document.get("fetched_at") if document is not None else None
    if not isinstance(fetched, int | float):
        return None
    age = time.time() - fetched
    keys = _keys_of(document)
    if keys is None or not 0 <= age < settings.auth_jwks_cache_s:
        return None
    return keys, age


def _save_disk_cache(settings: Settings, keys: list[Any]) -> None:
    path = _disk_cache(settings)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"fetched_at": time.time(), "keys": keys}, handle)
        os.replace(temporary, path)
    except OSError as error:  # a read-only file system, say: memory only, then
        log.debug("cannot keep the signing keys in %s: %s", path, type(error).__name__)


async def _fetch_jwks(settings: Settings) -> dict[str, _VerificationKey]:
    url = jwks_url(settings)
    failure: str | None = None
    try:
        async with httpx.AsyncClient(
            timeout=settings.auth_http_timeout_s, follow_redirects=False
        ) as client:
            response = await client.get(
                url, headers={"apikey": settings.supabase_anon_key.get_secret_value()}
            )
    except httpx.HTTPError as error:
        failure = type(error).__name__
    if failure is not None:
        raise AuthServiceUnavailable(f"could not fetch the signing keys from {url}: {failure}")
    if response.status_code != 200:
        raise AuthServiceUnavailable(
            f"fetching the signing keys from {url} answered HTTP {response.status_code}"
        )
    document = _json_object(response.content if len(response.content) <= _MAX_JWKS_BYTES else None)
    keys = _keys_of(document)
    if keys is None or document is None:
        raise AuthServiceUnavailable(f"{url} did not answer a JWK set")
    log.info("fetched %d signing key(s) from %s", len(keys), url)
    _save_disk_cache(settings, document["keys"])
    return keys


async def _signing_key(settings: Settings, kid: str) -> _VerificationKey:
    """The JWKS key named `kid`: from the cache, or after one (rate-limited) fetch.

    Concurrent callers share one fetch (single flight), whatever their event loop.
    """
    url = jwks_url(settings)
    for _ in range(3):
        now = time.monotonic()
        with _JWKS_LOCK:
            state = _JWKS.setdefault(url, _JwksState())
            if state.keys is None and state.inflight is None:
                cached = _load_disk_cache(settings)
                if cached is not None:
                    state.keys, state.fetched_at = cached[0], now - cached[1]
            wait = state.inflight
            if wait is None:
                fresh = (
                    state.keys is not None and now - state.fetched_at < settings.auth_jwks_cache_s
                )
                recently = now - state.attempted_at < settings.auth_jwks_min_refetch_interval_s
                if fresh and state.keys is not None and kid in state.keys:
                    return state.keys[kid]
                if not fresh and state.last_failed and recently:
                    raise AuthServiceUnavailable(
                        "the signing keys could not be fetched moments ago; try again later"
                    )
                if fresh and recently:
                    raise UnknownSigningKey(
                        f"no signing key has id {_safe(kid)} (the key set was fetched moments "
                        "ago and is not fetched again yet)"
                    )
                fetch: concurrent.futures.Future[None] = concurrent.futures.Future()
                fetch.set_running_or_notify_cancel()  # waiters cannot cancel it
                state.inflight, state.attempted_at = fetch, now
        if wait is not None:
            # NOTE: another task (any loop, any thread) is fetching: wait for it, then look again.
            await asyncio.wrap_future(wait)
            continue
        return await _refresh(settings, state, fetch, kid)
    raise UnknownSigningKey(f"no signing key of the project has id {_safe(kid)}")


async def _refresh(
    settings: Settings, state: _JwksState, fetch: concurrent.futures.Future[None], kid: str
) -> _VerificationKey:
    keys: dict[str, _VerificationKey] | None = None
    failure: AuthServiceUnavailable | None = None
    try:
        keys = await _fetch_jwks(settings)
    except AuthServiceUnavailable as error:
        failure = error
    finally:
        with _JWKS_LOCK:
            state.inflight = None
            if keys is not None:
                state.keys, state.fetched_at, state.last_failed = keys, time.monotonic(), False
            elif failure is not None:
                state.last_failed = True
                if time.monotonic() - state.fetched_at >= settings.auth_jwks_cache_s:
                    state.keys = None  # NOTE: never trust keys older than the cache limit
            else:
                state.attempted_at = -math.inf  # cancelled: let the next caller fetch
        fetch.set_result(None)
    if keys is None:
        raise AuthServiceUnavailable(failure.message if failure else "JWKS fetch was cancelled")
    if kid not in keys:
        raise UnknownSigningKey(f"no signing key of the project has id {_safe(kid)}")
    return keys[kid]


# --------------------------------------------------------------------------- Supabase Auth


async def _ask_supabase_auth(token: str, sub: str, settings: Settings) -> None:
    """`GET /auth/v1/user` through supabase-py's Auth client: the user must exist and the
    session must still be signed in. Errors are mapped without their cause, which holds the
    request (and so the token)."""
    failure: AuthError | None = None
    try:
        async with httpx.AsyncClient(
            timeout=settings.auth_http_timeout_s, follow_redirects=False
        ) as http:
            anon_key = settings.supabase_anon_key.get_secret_value()
            client = AsyncGoTrueClient(
                url=f"{settings.supabase_url}/auth/v1",
                headers={"apikey": anon_key, "Authorization": f"Bearer {anon_key}"},
                http_client=http,
                auto_refresh_token=False,
                persist_session=False,
            )
            response = await client.get_user(token)
    except AuthApiError as error:
        failure = _auth_api_failure(error.status, error.code)
    except AuthRetryableError as error:
        failure = AuthServiceUnavailable(
            f"Supabase Auth could not be reached (status {error.status or 'none'})"
        )
    except (SupabaseAuthError, httpx.HTTPError, ValueError) as error:
        failure = AuthServiceUnavailable(
            f"Supabase Auth gave an unreadable answer ({type(error).__name__})"
        )
    if failure is not None:
        raise failure
    user = response.user if response is not None else None
    if user is None or str(user.id) != sub:
        raise AuthServiceRejected(
            "Supabase Auth answered for another user than the token's subject",
            error_code="user_mismatch",
            status=200,
        )


def _auth_api_failure(status: int, error_code: str | None) -> AuthError:
    where = f"HTTP {status}" + (f" {error_code}" if error_code else "")
    if status >= 500 or status == 429:
        return AuthServiceUnavailable(f"Supabase Auth is unavailable ({where})")
    if status == 401 and error_code is None:
        # NOTE: the API gateway's own answer ({"message": "Invalid API key"}).
        return AuthConfigurationError(
            f"Supabase Auth refused the worker's API key ({where}); check SUPABASE_ANON_KEY"
        )
    if error_code == "user_not_found":
        return UserNotFound(
            "the token's user no longer exists in Supabase Auth",
            error_code=error_code,
            status=status,
        )
    if error_code == "session_not_found":
        return SessionNotFound(
            "the token's session has been signed out in Supabase Auth",
            error_code=error_code,
            status=status,
        )
    return AuthServiceRejected(
        f"Supabase Auth refused the token ({where})", error_code=error_code, status=status
    )


# --------------------------------------------------------------------------- entry point


async def verify_access_token(
    token: str | SecretStr,
    *,
    settings: Settings | None = None,
    allow_anonymous: bool = False,
    strict: bool | None = None,
) -> VerifiedClaims:
    """Verify a Supabase access token and return its claims (see the module docstring).

    Args:
        token: the bare access token (no `Bearer ` prefix).
        settings: defaults to `get_settings()`.
        allow_anonymous: accept tokens of anonymous sign-ins (`is_anonymous: true`).
        strict: ask Supabase Auth on top of a local check; defaults to `AUTH_STRICT`.

    Raises:
        AuthError: one subclass per reason; never retried by callers, except
            `AuthServiceUnavailable`, which is transient.
    """
    settings = settings or get_settings()
    raw = token.get_secret_value() if isinstance(token, SecretStr) else token
    if not isinstance(raw, str) or not raw:
        raise MalformedToken("no access token was given")
    strict = settings.auth_strict if strict is None else strict
    parsed = _parse(raw, settings.auth_max_token_bytes)
    algorithm = _check_header(parsed.header)
    kid = parsed.header.get("kid")
    payload = parsed.payload
    asked_auth = False

    if algorithm in _ASYMMETRIC:
        if not isinstance(kid, str) or not kid:
            raise UnknownSigningKey("token names no signing key (kid)")
        key = await _signing_key(settings, kid)
        if key.algorithm != algorithm:
            raise DisallowedAlgorithm(
                f"token algorithm {algorithm} does not match its key's algorithm {key.algorithm}"
            )
        if not _ALGORITHMS[algorithm].verify(parsed.signing_input, key.key, parsed.signature):
            raise BadSignature("the token's signature does not match its content")
        _check_claims(payload, settings=settings, allow_anonymous=allow_anonymous, now=time.time())
    elif settings.supabase_jwt_secret is not None:
        secret = settings.supabase_jwt_secret.get_secret_value().encode()
        expected = hmac.new(secret, parsed.signing_input, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, parsed.signature):
            raise BadSignature("the token's HS256 signature does not match SUPABASE_JWT_SECRET")
        _check_claims(payload, settings=settings, allow_anonymous=allow_anonymous, now=time.time())
    else:
        # NOTE: refuse plainly bad tokens before spending a call; acceptance needs Auth's word.
        _check_claims(payload, settings=settings, allow_anonymous=allow_anonymous, now=time.time())
        await _ask_supabase_auth(raw, payload["sub"], settings)
        asked_auth = True

    if strict and not asked_auth:
        await _ask_supabase_auth(raw, payload["sub"], settings)
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
