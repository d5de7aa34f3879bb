"""Why a token was refused: one `AuthError` subclass per reason.

Every message is safe to show an operator: it never holds the token, the JWT secret or the API
key, and values read from a token are shown only when short and harmless. Callers raise these
without their cause chain, since a cause (an httpx error, a decoding error) can carry the
request or the token's bytes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tenantflow.errors import TenantflowError

__all__ = [
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
]


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
