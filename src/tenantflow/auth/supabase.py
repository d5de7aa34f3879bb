"""Asking Supabase Auth itself about a token: `GET /auth/v1/user`.

`verify_access_token()` asks when it cannot check a legacy HS256 token locally, and on top of
a local check in strict mode (`AUTH_STRICT`), so that a signed-out session or a deleted user
is refused. The call goes through supabase-py's Auth client (`auth.get_user`), with the
project's anon key as `apikey`, one `httpx.AsyncClient` per call (no event-loop-bound state is
kept) and no redirects followed. The clients share one verified TLS context per process (httpx's
own choice of CA file), made again when that file changes: each client made its own, parsing
the whole CA bundle, about 50 ms a call.

Auth's answers are mapped to `AuthError` subclasses without their cause, which holds the
request (and so the token): `UserNotFound`, `SessionNotFound`, `AuthServiceRejected` for any
other refusal, `AuthConfigurationError` when the gateway refuses the worker's own API key, and
`AuthServiceUnavailable` (transient) for 5xx, 429 and network failures. Retrying is the
caller's choice.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import TYPE_CHECKING

from pydantic import SecretStr

from tenantflow.auth.errors import (
    AuthConfigurationError,
    AuthError,
    AuthServiceRejected,
    AuthServiceUnavailable,
    SessionNotFound,
    UserNotFound,
)

if TYPE_CHECKING:
    from tenantflow.settings import Settings

__all__ = ["ask_supabase_auth", "tls_context"]

_TLS_LOCK = threading.Lock()
_TLS: tuple[tuple[str, int, int], ssl.SSLContext] | None = None


def tls_context() -> ssl.SSLContext:
    """The verified TLS context httpx would make (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else
    certifi's bundle), made once and again whenever that file or folder changes."""
    global _TLS  # one context per process
    import certifi

    cafile, capath = os.environ.get("SSL_CERT_FILE"), None
    if not cafile:
        capath = os.environ.get("SSL_CERT_DIR") or None
        cafile = None if capath else certifi.where()
    source = cafile or capath or ""
    try:
        stat = os.stat(source)
        key = (source, stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = (source, -1, -1)
    with _TLS_LOCK:
        if _TLS is None or _TLS[0] != key or key[1] == -1:
            _TLS = (key, ssl.create_default_context(cafile=cafile, capath=capath))
        return _TLS[1]


async def ask_supabase_auth(token: SecretStr, sub: str, settings: Settings) -> None:
    """`GET /auth/v1/user` through supabase-py's Auth client: the user must exist, be the
    token's subject `sub`, and the session must still be signed in."""
    # NOTE: supabase-py's Auth client and httpx are imported here, on the slow path only:
    # most checks are local, and every flow-run process pays for its imports.
    import httpx
    from supabase_auth import AsyncGoTrueClient
    from supabase_auth.errors import AuthApiError, AuthRetryableError
    from supabase_auth.errors import AuthError as SupabaseAuthError

    failure: AuthError | None = None
    try:
        async with httpx.AsyncClient(
            timeout=settings.auth_http_timeout_s, follow_redirects=False, verify=tls_context()
        ) as http:
            anon_key = settings.supabase_anon_key.get_secret_value()
            client = AsyncGoTrueClient(
                url=f"{settings.supabase_url}/auth/v1",
                headers={"apikey": anon_key, "Authorization": f"Bearer {anon_key}"},
                http_client=http,
                auto_refresh_token=False,
                persist_session=False,
            )
            response = await client.get_user(token.get_secret_value())
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
