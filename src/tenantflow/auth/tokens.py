"""Reading and checking one access token, with no I/O: the pure part of verification.

In the order `verify_access_token()` runs them:

1. `parse_token()`: size (`AUTH_MAX_TOKEN_BYTES`) and shape: three base64url segments, JSON
   header and payload; Supabase's new API keys and a `Bearer ` prefix are refused by name;
2. `check_header()`: `typ`, if present, is `JWT`; no `crit`; `alg` is ES256, RS256 or HS256
   (`none` and everything else refused). `jku`, `x5u`, `jwk` and `x5c` play no part: the key
   is always the caller's;
3. `check_signature()` against one given key of the project's JWKS (whose algorithm must be
   the token's), or `check_hs256_signature()` against the legacy JWT secret;
4. `check_claims()`, by this module and not by a library: not an API key (`anon`/
   `service_role` key without `sub`), `exp`/`nbf`/`iat` with a leeway, `iss`, `aud` is
   `authenticated`, `role == "authenticated"`, `sub` a UUID, `is_anonymous` refused unless
   allowed, and the types of the other claims Supabase sets.

Every refusal is an `AuthError` subclass whose message never holds the token; values read
from a token are shown only when short and harmless (`shown()`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from jwt.algorithms import get_default_algorithms
from pydantic import SecretStr

from tenantflow.auth.errors import (
    AnonymousNotAllowed,
    ApiKeyUsedAsToken,
    BadSignature,
    DisallowedAlgorithm,
    InvalidAudience,
    InvalidIssuer,
    InvalidRole,
    InvalidSubject,
    MalformedToken,
    TokenExpired,
    TokenNotYetValid,
    TokenTooLarge,
)

__all__ = [
    "API_KEY_ROLES",
    "ASYMMETRIC_ALGORITHMS",
    "AUDIENCE",
    "OPERATOR_APP_METADATA_KEY",
    "OPERATOR_ROLE",
    "USER_ROLE",
    "Algorithm",
    "ParsedToken",
    "VerificationKey",
    "app_metadata_grants_operator",
    "check_claims",
    "check_header",
    "check_hs256_signature",
    "check_signature",
    "json_object",
    "parse_token",
    "shown",
]

AUDIENCE = "authenticated"
USER_ROLE = "authenticated"
API_KEY_ROLES = frozenset({"anon", "service_role"})
#: The `app_metadata` key that lists a user's tenantflow roles, and the operator's role.
#: Only the service role can write `app_metadata` (users cannot grant it to themselves).
OPERATOR_APP_METADATA_KEY = "roles"
OPERATOR_ROLE = "tenantflow_operator"

Algorithm = Literal["ES256", "RS256", "HS256"]
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset({"ES256", "RS256"})
_JWT_SEGMENTS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_SHOWABLE = re.compile(r"^[A-Za-z0-9 :/._@+-]{0,100}$")
_NEW_API_KEY_PREFIXES = ("sb_publishable_", "sb_secret_")
_ALGORITHMS = get_default_algorithms()


@dataclass(frozen=True)
class ParsedToken:
    """A token's decoded header and payload, and what its signature covers.

    NOTE: the signed bytes and the signature stay out of the repr, so a logged or printed
    parsed token does not hand out its content.
    """

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes = field(repr=False)
    signature: bytes = field(repr=False)


@dataclass(frozen=True)
class VerificationKey:
    """One public key of the project's JWKS and the one algorithm it may verify."""

    kid: str
    algorithm: Algorithm
    key: Any  # a cryptography public key


def shown(value: Any) -> str:
    """A value read from a token, shown only when short and plain (never a token)."""
    if isinstance(value, str) and _SHOWABLE.match(value) and value.count(".") < 2:
        return repr(value)
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    return "<not shown>"


def json_object(raw: bytes | None) -> dict[str, Any] | None:
    """`raw` as a JSON object, or None when it is not one (or not JSON at all)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _b64decode(segment: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None


def parse_token(token: SecretStr, max_bytes: int) -> ParsedToken:
    """Split and decode `token`, refusing it when too large or not a JWT at all."""
    raw = token.get_secret_value()
    if not isinstance(raw, str) or not raw:
        raise MalformedToken("no access token was given")
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise TokenTooLarge(
            f"access token is {size} bytes; at most {max_bytes} are accepted (AUTH_MAX_TOKEN_BYTES)"
        )
    if raw.startswith(_NEW_API_KEY_PREFIXES):
        raise ApiKeyUsedAsToken(
            "a Supabase API key (sb_publishable_/sb_secret_) was given instead of a user's "
            "access token"
        )
    if raw[:7].lower() == "bearer ":
        raise MalformedToken("pass the bare access token, without the 'Bearer ' prefix")
    if not _JWT_SEGMENTS.match(raw):
        raise MalformedToken(
            "access token is not a JWT (expected three base64url segments separated by dots)"
        )
    header_b64, payload_b64, signature_b64 = raw.split(".")
    header = json_object(_b64decode(header_b64))
    if header is None:
        raise MalformedToken("access token header is not a base64url-encoded JSON object")
    payload = json_object(_b64decode(payload_b64))
    if payload is None:
        raise MalformedToken("access token payload is not a base64url-encoded JSON object")
    signature = _b64decode(signature_b64)
    if signature is None:
        raise MalformedToken("access token signature is not base64url")
    return ParsedToken(
        header=header,
        payload=payload,
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=signature,
    )


def check_header(header: Mapping[str, Any]) -> Algorithm:
    """The token's algorithm, if the header is one this module accepts."""
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise MalformedToken(f"token type (typ) {shown(typ)} is not JWT")
    if "crit" in header:
        raise MalformedToken("tokens with critical header extensions (crit) are not accepted")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise DisallowedAlgorithm("unsigned tokens (alg none or missing) are not accepted")
    if alg not in ASYMMETRIC_ALGORITHMS and alg != "HS256":
        raise DisallowedAlgorithm(
            f"token algorithm {shown(alg)} is not accepted (ES256, RS256 or legacy HS256)"
        )
    return alg  # type: ignore[return-value]


def check_signature(parsed: ParsedToken, algorithm: Algorithm, key: VerificationKey) -> None:
    """The signature is `key`'s, and `key` is one of the token's algorithm.

    NOTE: the key alone decides the algorithm (EC P-256: ES256, RSA: RS256); a token whose
    `alg` differs is refused rather than checked with the algorithm it asks for.
    """
    if key.algorithm != algorithm:
        raise DisallowedAlgorithm(
            f"token algorithm {algorithm} does not match its key's algorithm {key.algorithm}"
        )
    if not _ALGORITHMS[algorithm].verify(parsed.signing_input, key.key, parsed.signature):
        raise BadSignature("the token's signature does not match its content")


def check_hs256_signature(parsed: ParsedToken, secret: bytes) -> None:
    """The legacy HS256 signature, made with the project's JWT secret."""
    expected = hmac.new(secret, parsed.signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, parsed.signature):
        raise BadSignature("the token's HS256 signature does not match SUPABASE_JWT_SECRET")


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


def _uuid(value: str) -> UUID | None:
    try:
        return UUID(value)
    except ValueError:
        return None


def check_claims(
    payload: Mapping[str, Any],
    *,
    issuer: str,
    leeway_s: float,
    allow_anonymous: bool,
    now: float,
) -> None:
    """Every claim, checked here rather than by a library.

    Args:
        issuer: the only accepted `iss`, `SUPABASE_URL + "/auth/v1"`.
        leeway_s: clock skew tolerated on `exp`, `nbf` and `iat` (`AUTH_LEEWAY_S`).
        allow_anonymous: accept tokens of anonymous sign-ins (`is_anonymous: true`).
        now: the current time, in seconds since the epoch.
    """
    role = payload.get("role")
    if role in API_KEY_ROLES and "sub" not in payload:
        raise ApiKeyUsedAsToken(
            f"the project's {role} API key was given instead of a user's access token"
        )
    exp = _required_number(payload, "exp")
    if now > exp + leeway_s:
        raise TokenExpired(f"access token expired at {_when(exp)} ({now - exp:.0f} s ago)")
    nbf = _number(payload, "nbf")
    if nbf is not None and now + leeway_s < nbf:
        raise TokenNotYetValid(f"access token is not valid before {_when(nbf)} (nbf)")
    iat = _required_number(payload, "iat")
    if now + leeway_s < iat:
        raise TokenNotYetValid(f"access token was issued in the future, at {_when(iat)} (iat)")
    iss = payload.get("iss")
    if iss != issuer:
        raise InvalidIssuer(f"token issuer (iss) {shown(iss)} is not {issuer!r}")
    aud = payload.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if AUDIENCE not in audiences or not all(isinstance(a, str) for a in audiences):
        raise InvalidAudience(f"token audience (aud) {shown(aud)} is not {AUDIENCE!r}")
    if role != USER_ROLE:
        raise InvalidRole(f"token role {shown(role)} is not {USER_ROLE!r}")
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


def app_metadata_grants_operator(app_metadata: Mapping[str, Any] | str | None) -> bool:
    """Whether `app_metadata` (a token's, or `auth.users.raw_app_meta_data` as a mapping or
    JSON text) grants the operator role: `{"roles": [..., "tenantflow_operator", ...]}`."""
    if isinstance(app_metadata, str):
        app_metadata = json_object(app_metadata.encode())
    if not isinstance(app_metadata, Mapping):
        return False
    roles = app_metadata.get(OPERATOR_APP_METADATA_KEY)
    return isinstance(roles, list) and OPERATOR_ROLE in roles
