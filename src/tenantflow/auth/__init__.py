"""Verification of Supabase access tokens, in five rooms:

- `errors`: the `AuthError` tree, one subclass per reason a token is refused;
- `tokens`: reading and checking one token, with no I/O (size, shape, header, signature
  against a given key, claims);
- `jwks`: `JwksCache`, the project's signing keys fetched, cached and kept on disk;
- `supabase`: asking Supabase Auth itself (`GET /auth/v1/user`);
- `verify`: `verify_access_token()`, which composes them (its docstring lists every check).

Everything callers use is importable from `tenantflow.auth` directly. Where this sits in
the order of checks: docs/security.md.
"""

from __future__ import annotations

from tenantflow.auth.errors import (
    AnonymousNotAllowed,
    ApiKeyUsedAsToken,
    AuthConfigurationError,
    AuthError,
    AuthServiceRejected,
    AuthServiceUnavailable,
    BadSignature,
    DisallowedAlgorithm,
    InvalidAudience,
    InvalidIssuer,
    InvalidRole,
    InvalidSubject,
    MalformedToken,
    SessionNotFound,
    TokenExpired,
    TokenNotYetValid,
    TokenTooLarge,
    UnknownSigningKey,
    UserNotFound,
)
from tenantflow.auth.jwks import JwksCache, jwks_url
from tenantflow.auth.tokens import (
    OPERATOR_APP_METADATA_KEY,
    OPERATOR_ROLE,
    app_metadata_grants_operator,
)
from tenantflow.auth.verify import (
    DEFAULT_JWKS_CACHE,
    VerifiedClaims,
    clear_jwks_cache,
    verify_access_token,
)

__all__ = [
    "DEFAULT_JWKS_CACHE",
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
    "JwksCache",
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
