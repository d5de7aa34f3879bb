"""An operator's own Supabase session on their machine, and what it is used for.

`tenantflow login` signs the operator in with supabase-py's Auth client (email and
password, or a one-time code sent by email) and keeps the session (access token, refresh
token, expiry, user id and email) in a JSON file only that OS user can read: mode 0600 in
a 0700 folder, written atomically (a temporary file created 0600, then renamed). Like ssh
with a private key, a session file (or its folder) that others may read or write, or that
another user owns, is refused, never used.

`current_access_token()` hands out the access token, refreshing it with the refresh token
when it expires within `REFRESH_MARGIN_S` and saving the rotated session; a refresh token
that Auth no longer accepts (reused, revoked, its session signed out) deletes the file and
says "signed out: run `tenantflow login`". `sealed_token_for_run()` seals that token to the
workers' public key (`load_public_key()`: configuration the operator trusts, never read
from Prefect) for one run. The operator grant itself (`app_metadata.roles`) is managed with
the service-role key through Auth's admin API (`grant_operator`, `revoke_operator`,
`list_operators`); that key is never stored.

Every deliberate failure is an `OperatorSessionError` whose message is one line, safe to
show: no token, password, code or key ever appears in a message, a log or a file other
than the session file. supabase-py's errors are translated without their cause (which holds
the request).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from pydantic import SecretStr

from tenantflow.auth.tokens import (
    OPERATOR_APP_METADATA_KEY,
    OPERATOR_ROLE,
    app_metadata_grants_operator,
)
from tenantflow.errors import TenantflowError

if TYPE_CHECKING:
    from supabase_auth import SyncGoTrueAdminAPI, SyncGoTrueClient
    from supabase_auth.types import Session, SignInWithPasswordCredentials, VerifyOtpParams

    from tenantflow.settings import OperatorSettings

__all__ = [
    "OPERATOR_FLOWS",
    "REFRESH_MARGIN_S",
    "SIGNED_OUT",
    "AuthUnreachable",
    "NotAnOperator",
    "OperatorSession",
    "OperatorSessionError",
    "PublicKeyMissing",
    "SessionFileUnsafe",
    "SignInRefused",
    "SignedOut",
    "Whoami",
    "access_token_for_flow",
    "current_access_token",
    "current_session",
    "delete_session",
    "grant_operator",
    "list_operators",
    "load_public_key",
    "login_with_otp",
    "login_with_password",
    "logout",
    "operator_flow_refusal",
    "read_session",
    "request_otp",
    "revoke_operator",
    "sealed_token_for_run",
    "session_path",
    "token_claims",
    "whoami",
    "write_session",
]

#: An access token expiring within this many seconds is refreshed before it is used, so a
#: sealed copy still verifies when the worker opens it a little later.
REFRESH_MARGIN_S = 60.0
#: The flows whose runs admit operators only (the worker refuses anyone else).
OPERATOR_FLOWS = frozenset({"nightly-rollup", "migrate"})
SIGNED_OUT = "signed out: run `tenantflow login`"
_NOT_SIGNED_IN = "not signed in: run `tenantflow login`"
#: Auth's answers to a refresh token it will not take again (GoTrue's error codes).
_SIGNED_OUT_CODES = frozenset(
    {"refresh_token_already_used", "refresh_token_not_found", "session_not_found"}
)
_FORMAT = 1
_T = TypeVar("_T")
_MAX_FILE_BYTES = 64 * 1024
_USERS_PER_PAGE = 200
_MAX_USER_PAGES = 10_000


class OperatorSessionError(TenantflowError):
    """A refusal of the operator's commands; the message is one safe line."""


class SessionFileUnsafe(OperatorSessionError):
    """The session file or its folder can be read or changed by someone else."""


class SignedOut(OperatorSessionError):
    """No usable session: never signed in, signed out, or the refresh token was refused."""


class SignInRefused(OperatorSessionError):
    """Supabase Auth refused the sign-in (wrong password or code, expired code...)."""


class AuthUnreachable(OperatorSessionError):
    """Supabase Auth did not answer, or answered with a server error."""


class PublicKeyMissing(OperatorSessionError):
    """Neither SEAL_PUBLIC_KEY nor SEAL_PUBLIC_KEY_FILE is usable."""


class NotAnOperator(OperatorSessionError):
    """The signed-in user asks for a token of a flow only operators may run."""


@dataclass(frozen=True)
class OperatorSession:
    """One signed-in session as the session file keeps it.

    NOTE: the tokens stay `SecretStr` and out of the repr, so a logged session shows none.
    """

    supabase_url: str
    user_id: str
    email: str
    access_token: SecretStr = field(repr=False)
    refresh_token: SecretStr = field(repr=False)
    expires_at: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "supabase_url": self.supabase_url,
                "user_id": self.user_id,
                "email": self.email,
                "access_token": self.access_token.get_secret_value(),
                "refresh_token": self.refresh_token.get_secret_value(),
                "expires_at": self.expires_at,
            },
            indent=2,
        )

    @classmethod
    def from_document(cls, document: object, path: Path) -> OperatorSession:
        unreadable = SessionFileUnsafe(
            f"{path} is not a tenantflow session file: delete it and run `tenantflow login`"
        )
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise unreadable
        texts = ("supabase_url", "user_id", "email", "access_token", "refresh_token")
        if not all(isinstance(document.get(name), str) for name in texts):
            raise unreadable
        expires_at = document.get("expires_at")
        if isinstance(expires_at, bool) or not isinstance(expires_at, int):
            raise unreadable
        return cls(
            supabase_url=document["supabase_url"],
            user_id=document["user_id"],
            email=document["email"],
            access_token=SecretStr(document["access_token"]),
            refresh_token=SecretStr(document["refresh_token"]),
            expires_at=expires_at,
        )

    @classmethod
    def from_supabase(cls, session: Session, supabase_url: str) -> OperatorSession:
        """The session supabase-py returned from a sign-in, a code or a refresh."""
        expires_at = session.expires_at or int(time.time()) + int(session.expires_in)
        return cls(
            supabase_url=supabase_url,
            user_id=str(session.user.id),
            email=session.user.email or "",
            access_token=SecretStr(session.access_token),
            refresh_token=SecretStr(session.refresh_token),
            expires_at=int(expires_at),
        )


# --- the session file ----------------------------------------------------------------------


def session_path(settings: OperatorSettings, override: Path | str | None = None) -> Path:
    """The session file: `override` (`--session-file`), TENANTFLOW_SESSION_FILE, else
    `$XDG_CONFIG_HOME/tenantflow/session.json` (default `~/.config/tenantflow/...`)."""
    if override is not None:
        return Path(override).expanduser().absolute()
    if settings.tenantflow_session_file is not None:
        return settings.tenantflow_session_file.expanduser().absolute()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home).expanduser().absolute() / "tenantflow" / "session.json"


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _check_private(path: Path, st: os.stat_result, *, folder: bool) -> None:
    """Refuse, as ssh does, what others may read or change, or another user owns."""
    kind, fix = ("folder", "chmod 700") if folder else ("session file", "chmod 600")
    if folder and not stat.S_ISDIR(st.st_mode):
        raise SessionFileUnsafe(f"{path} (the session file's folder) is not a folder")
    if not folder and not stat.S_ISREG(st.st_mode):
        raise SessionFileUnsafe(f"session file {path} is not a regular file: delete it")
    if st.st_uid != os.getuid():
        raise SessionFileUnsafe(
            f"{kind} {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}): "
            "delete it and run `tenantflow login`"
        )
    others = stat.S_IMODE(st.st_mode) & 0o077
    if others:
        what = "readable by others" if others & 0o044 else "writable by others"
        if folder and not others & 0o044:
            what = "open to others"
        raise SessionFileUnsafe(f"{kind} {path} is {what} (mode {_mode(st)}); {fix} {path}")


def _check_folder(folder: Path) -> None:
    try:
        st = folder.stat()
    except FileNotFoundError:
        return
    _check_private(folder, st, folder=True)


def read_session(path: Path) -> OperatorSession | None:
    """The session in `path`, or None when there is no file.

    Raises:
        SessionFileUnsafe: the file or its folder is readable or writable by others, owned by
            another user, a symbolic link, or not a session file.
    """
    _check_folder(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise SessionFileUnsafe(
                f"session file {path} is a symbolic link: delete it and run `tenantflow login`"
            ) from None
        raise
    with os.fdopen(fd, "rb") as file:
        _check_private(path, os.fstat(file.fileno()), folder=False)
        raw = file.read(_MAX_FILE_BYTES + 1)
    try:
        document = json.loads(raw) if len(raw) <= _MAX_FILE_BYTES else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        document = None
    return OperatorSession.from_document(document, path)


def write_session(path: Path, session: OperatorSession) -> None:
    """Write `session` to `path` atomically: a temporary file in the same folder, created
    with mode 0600 (never readable by others, not even briefly), then renamed over it.
    The folder is created 0700 if missing, and refused if others may use it."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_folder(folder)
    # NOTE: mkstemp creates the file O_EXCL with mode 0600, whatever the umask.
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(session.to_json() + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)


def delete_session(path: Path) -> bool:
    """Delete the session file; whether there was one."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def _session_lock(path: Path) -> Iterator[None]:
    """Hold the session's lock, so two commands never refresh the same refresh token
    (the second would present a token the first already rotated)."""
    folder = path.parent
    if not folder.is_dir():
        yield
        return
    _check_folder(folder)
    fd = os.open(folder / f".{path.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- Supabase Auth ---------------------------------------------------------------------------


@contextlib.contextmanager
def _auth_client(settings: OperatorSettings) -> Iterator[SyncGoTrueClient]:
    """supabase-py's Auth client for the project, with the anon key, no session storage and
    no background refresh (this module stores and refreshes the session itself)."""
    import httpx
    from supabase_auth import SyncGoTrueClient

    anon_key = settings.supabase_anon_key.get_secret_value()
    with httpx.Client(timeout=settings.auth_http_timeout_s, follow_redirects=False) as http:
        yield SyncGoTrueClient(
            url=f"{settings.supabase_url}/auth/v1",
            headers={"apikey": anon_key, "Authorization": f"Bearer {anon_key}"},
            http_client=http,
            auto_refresh_token=False,
            persist_session=False,
            flow_type="implicit",
        )


@contextlib.contextmanager
def _admin_client(
    settings: OperatorSettings, service_role_key: SecretStr
) -> Iterator[SyncGoTrueAdminAPI]:
    """supabase-py's Auth admin API, with the service-role key (kept in memory only)."""
    import httpx
    from supabase_auth import SyncGoTrueAdminAPI

    key = service_role_key.get_secret_value()
    with httpx.Client(timeout=settings.auth_http_timeout_s, follow_redirects=False) as http:
        yield SyncGoTrueAdminAPI(
            url=f"{settings.supabase_url}/auth/v1",
            headers={"apikey": key, "Authorization": f"Bearer {key}"},
            http_client=http,
        )


#: What to say for Auth's error codes, by what was being done (`{url}` is SUPABASE_URL).
_REFUSALS: Mapping[str, str] = {
    "invalid_credentials": "wrong email or password",
    "otp_expired": "the code is wrong or has expired: run `tenantflow login --otp` for a new one",
    "email_not_confirmed": "the email address is not confirmed in Supabase Auth yet",
    "user_banned": "this user is banned in Supabase Auth",
    "otp_disabled": (
        "Supabase Auth sends no one-time code for this address (no such user, or email "
        "codes are off for the project): sign in with the password instead"
    ),
    "signup_disabled": "no such user in Supabase Auth (sign-ups are off)",
    "user_not_found": "no such user in Supabase Auth",
    "over_request_rate_limit": "Supabase Auth limits requests: wait a minute and try again",
    "over_email_send_rate_limit": (
        "Supabase Auth limits how often it sends codes: wait a minute and try again"
    ),
    "not_admin": "Supabase Auth refused the service-role key: check it (Project Settings → API)",
    "bad_jwt": "Supabase Auth refused the key or token it was given (bad_jwt)",
    "validation_failed": "Supabase Auth refused the request as invalid (validation_failed)",
}


def _translated(error: Exception, settings: OperatorSettings, *, key: str = "anon") -> Exception:
    """supabase-py's (and httpx's) error as one of ours, safe to show, without its cause."""
    import httpx
    from pydantic import ValidationError
    from supabase_auth.errors import AuthApiError, AuthRetryableError
    from supabase_auth.errors import AuthError as SupabaseAuthError

    where = f"Supabase Auth at {settings.supabase_url}"
    if isinstance(error, AuthRetryableError):
        if error.status:
            return AuthUnreachable(f"{where} is unavailable (HTTP {error.status}): try again later")
        return AuthUnreachable(f"{where} does not answer: check SUPABASE_URL, or try again later")
    if isinstance(error, AuthApiError):
        code = error.code or ""
        if error.status == 401 and not code:
            which = "SUPABASE_ANON_KEY" if key == "anon" else "the service-role key"
            return SignInRefused(f"{where} refused the API key (HTTP 401): check {which}")
        if error.status >= 500 or (error.status == 429 and not code):
            return AuthUnreachable(f"{where} is unavailable (HTTP {error.status}): try again later")
        if code in _REFUSALS:
            return SignInRefused(_REFUSALS[code])
        return SignInRefused(f"{where} refused (HTTP {error.status}{' ' + code if code else ''})")
    if isinstance(error, SupabaseAuthError):
        return SignInRefused(f"{where}: {error.message}")
    if isinstance(error, httpx.HTTPError | ValidationError | ValueError):
        return AuthUnreachable(f"{where} gave an unreadable answer ({type(error).__name__})")
    return error


def _auth_errors() -> tuple[type[Exception], ...]:
    import httpx
    from pydantic import ValidationError
    from supabase_auth.errors import AuthError as SupabaseAuthError

    return (SupabaseAuthError, httpx.HTTPError, ValidationError, ValueError)


def _signed_in(settings: OperatorSettings, path: Path, session: Session | None) -> OperatorSession:
    if session is None:
        raise SignInRefused("Supabase Auth answered without a session: sign in again")
    stored = OperatorSession.from_supabase(session, settings.supabase_url)
    # NOTE: the folder first, so that even the first sign-in holds the session's lock.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _session_lock(path):
        write_session(path, stored)
    return stored


def _asking_auth(settings: OperatorSettings, call: Callable[[SyncGoTrueClient], _T]) -> _T:
    """`call` with the Auth client; supabase-py's failures become ours."""
    try:
        with _auth_client(settings) as client:
            return call(client)
    except _auth_errors() as error:
        raise _translated(error, settings) from None


def login_with_password(
    settings: OperatorSettings, path: Path, *, email: str, password: SecretStr
) -> OperatorSession:
    """Sign in with email and password (`sign_in_with_password`) and save the session."""
    credentials: SignInWithPasswordCredentials = {
        "email": email,
        "password": password.get_secret_value(),
    }
    response = _asking_auth(settings, lambda auth: auth.sign_in_with_password(credentials))
    return _signed_in(settings, path, response.session)


def request_otp(settings: OperatorSettings, *, email: str) -> None:
    """Ask Supabase Auth to email a one-time code to an existing user (never creates one)."""
    _asking_auth(
        settings,
        lambda auth: auth.sign_in_with_otp(
            {"email": email, "options": {"should_create_user": False}}
        ),
    )


def login_with_otp(
    settings: OperatorSettings, path: Path, *, email: str, code: SecretStr
) -> OperatorSession:
    """Sign in with the emailed one-time code (`verify_otp`, type `email`); save the session."""
    params: VerifyOtpParams = {"email": email, "token": code.get_secret_value(), "type": "email"}
    response = _asking_auth(settings, lambda auth: auth.verify_otp(params))
    return _signed_in(settings, path, response.session)


def _stored_or_signed_out(settings: OperatorSettings, path: Path) -> OperatorSession:
    stored = read_session(path)
    if stored is None:
        raise SignedOut(_NOT_SIGNED_IN)
    if stored.supabase_url != settings.supabase_url:
        raise SignedOut(
            f"the session in {path} is for {stored.supabase_url}, not SUPABASE_URL "
            f"{settings.supabase_url}: run `tenantflow login`"
        )
    return stored


def _refresh(settings: OperatorSettings, path: Path, stored: OperatorSession) -> OperatorSession:
    """Trade the refresh token for a new session (Auth rotates the refresh token) and save
    it; a refresh token Auth refuses for good deletes the file."""
    from supabase_auth.errors import AuthApiError

    try:
        with _auth_client(settings) as client:
            response = client.refresh_session(stored.refresh_token.get_secret_value())
    except AuthApiError as error:
        if error.code in _SIGNED_OUT_CODES or error.code == "user_not_found":
            delete_session(path)
            raise SignedOut(SIGNED_OUT) from None
        raise _translated(error, settings) from None
    except _auth_errors() as error:
        raise _translated(error, settings) from None
    if response.session is None:
        delete_session(path)
        raise SignedOut(SIGNED_OUT)
    refreshed = OperatorSession.from_supabase(response.session, settings.supabase_url)
    write_session(path, refreshed)
    return refreshed


def current_session(
    settings: OperatorSettings,
    session_file: Path | str | None = None,
    *,
    margin_s: float = REFRESH_MARGIN_S,
    force_refresh: bool = False,
) -> OperatorSession:
    """The signed-in session, refreshed first when its access token expires within
    `margin_s` seconds (or `force_refresh`), the rotated session saved.

    Raises:
        SignedOut: no session file, a session of another project, or Auth refuses the
            refresh token for good (the file is then deleted).
        SessionFileUnsafe: see `read_session`.
        AuthUnreachable: a refresh was needed and Auth did not answer.
    """
    path = session_path(settings, session_file)
    with _session_lock(path):
        stored = _stored_or_signed_out(settings, path)
        if not force_refresh and stored.expires_at - time.time() > margin_s:
            return stored
        return _refresh(settings, path, stored)


def current_access_token(
    settings: OperatorSettings, session_file: Path | str | None = None
) -> SecretStr:
    """The signed-in operator's access token, valid for at least `REFRESH_MARGIN_S` more
    seconds (refreshed and saved when needed): what `tenantflow token` and `tenantflow run`
    seal. Raises as `current_session` does."""
    return current_session(settings, session_file).access_token


def token_claims(token: SecretStr) -> dict[str, Any]:
    """The access token's claims, decoded WITHOUT checking its signature: for display and
    early advice only, never to decide anything (the worker verifies the token)."""
    from tenantflow.auth.errors import AuthError
    from tenantflow.auth.tokens import parse_token

    try:
        return dict(parse_token(token, 64 * 1024).payload)
    except AuthError:
        return {}


def logout(settings: OperatorSettings, session_file: Path | str | None = None) -> str:
    """Sign the session out at Supabase Auth (`sign_out`, this session only: its refresh
    token is revoked), then delete the file, even when Auth cannot be reached.

    Returns:
        One line saying what was done.
    """
    from supabase_auth.errors import AuthApiError

    path = session_path(settings, session_file)
    with _session_lock(path):
        try:
            stored = read_session(path)
        except SessionFileUnsafe:
            # NOTE: a file others could read may have been copied: it is deleted all the same
            # (not used), and the operator told to sign out everywhere.
            delete_session(path)
            return (
                f"deleted {path} without using it (others could read or change it); to revoke "
                "its session, sign in again and run `tenantflow logout`, or sign the user out "
                "of every session in Supabase"
            )
        if stored is None:
            return f"not signed in (no {path})"
        revoked = "its session is revoked at Supabase Auth"
        try:
            with _auth_client(settings) as client:
                client.set_session(
                    stored.access_token.get_secret_value(),
                    stored.refresh_token.get_secret_value(),
                )
                client.sign_out({"scope": "local"})
        except AuthApiError as error:
            if error.code in _SIGNED_OUT_CODES or error.status in (401, 403, 404):
                revoked = "its session was already signed out at Supabase Auth"
            else:
                revoked = f"Supabase Auth refused to sign it out ({_translated(error, settings)})"
        except _auth_errors() as error:
            revoked = (
                f"its session could NOT be revoked ({_translated(error, settings)}); its "
                "refresh token stays valid at Auth until it is signed out there"
            )
        delete_session(path)
    return f"signed out: deleted {path}; {revoked}"


@dataclass(frozen=True)
class Whoami:
    """Who the session is for, and until when (for `tenantflow whoami`)."""

    email: str
    user_id: str
    #: Whether `app_metadata.roles` holds `tenantflow_operator`.
    operator: bool
    #: Where `operator` was read: Supabase Auth's user, or the (unverified) access token.
    operator_source: str
    expires_at: int
    session_file: Path


def whoami(settings: OperatorSettings, session_file: Path | str | None = None) -> Whoami:
    """The signed-in user and their operator grant, as Supabase Auth has it now
    (`get_user`); when Auth cannot be reached, as the access token claims it (display only)."""
    from supabase_auth.errors import AuthApiError

    path = session_path(settings, session_file)
    session = current_session(settings, path)
    source = "Supabase Auth"
    try:
        with _auth_client(settings) as client:
            response = client.get_user(session.access_token.get_secret_value())
        user = response.user if response is not None else None
        app_metadata: Any = user.app_metadata if user is not None else None
    except AuthApiError as error:
        if error.code in _SIGNED_OUT_CODES or error.code == "user_not_found":
            with _session_lock(path):
                delete_session(path)
            raise SignedOut(SIGNED_OUT) from None
        raise _translated(error, settings) from None
    except _auth_errors():
        source = "the access token (not verified: Supabase Auth does not answer)"
        app_metadata = token_claims(session.access_token).get("app_metadata")
    return Whoami(
        email=session.email,
        user_id=session.user_id,
        operator=app_metadata_grants_operator(app_metadata),
        operator_source=source,
        expires_at=session.expires_at,
        session_file=path,
    )


# --- sealing for a run ---------------------------------------------------------------------


def load_public_key(settings: OperatorSettings) -> str:
    """The workers' public JWK (JSON text) from SEAL_PUBLIC_KEY or SEAL_PUBLIC_KEY_FILE.

    Raises:
        PublicKeyMissing: neither is set, the file cannot be read, or it is not one public
            JWK (a private key is refused: it belongs on the workers only).
    """
    hint = (
        "set SEAL_PUBLIC_KEY (the workers' public JWK, JSON) or SEAL_PUBLIC_KEY_FILE (a file "
        "holding it); the platform team prints it with `tenantflow seal-key public`"
    )
    if settings.seal_public_key is not None:
        text, origin = settings.seal_public_key, "SEAL_PUBLIC_KEY"
    elif settings.seal_public_key_file is not None:
        origin = f"SEAL_PUBLIC_KEY_FILE {settings.seal_public_key_file}"
        try:
            text = settings.seal_public_key_file.expanduser().read_text(encoding="utf-8")
        except OSError as error:
            raise PublicKeyMissing(f"cannot read {origin}: {error.strerror}; {hint}") from None
    else:
        raise PublicKeyMissing(f"no public key to seal with: {hint}")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise PublicKeyMissing(f"{origin} is not JSON; {hint}") from None
    if not isinstance(document, dict) or "keys" in document:
        raise PublicKeyMissing(f"{origin} must be one public JWK (a JSON object); {hint}")
    if "d" in document:
        # NOTE: never echo any of it: `d` is the workers' private key.
        raise PublicKeyMissing(
            f"{origin} holds a PRIVATE key: remove it from this machine; operators need only "
            "the public key (`tenantflow seal-key public`)"
        )
    if not isinstance(document.get("kid"), str):
        raise PublicKeyMissing(f"{origin} has no kid; {hint}")
    return text.strip()


def operator_flow_refusal(flow: str, email: str, claims: Mapping[str, Any]) -> str | None:
    """Why a token of `flow` for this user is refused early, or None: runs of operator
    flows admit only a token whose `app_metadata` grants the operator role (the worker
    refuses any other, after confirming the grant in `auth.users`)."""
    if flow not in OPERATOR_FLOWS or app_metadata_grants_operator(claims.get("app_metadata")):
        return None
    return (
        f"{flow} runs only for tenantflow operators, and {email or 'this user'} is not one "
        f"(app_metadata.{OPERATOR_APP_METADATA_KEY} lacks {OPERATOR_ROLE}): the worker would "
        "refuse the run; an operator grants it with `tenantflow operator grant EMAIL`"
    )


def access_token_for_flow(
    settings: OperatorSettings, flow: str, session_file: Path | str | None = None
) -> SecretStr:
    """The signed-in user's access token for a run of `flow` (`current_access_token`),
    refused at once for an operator flow when the user holds no operator grant.

    A token whose claims lack the grant is refreshed once first (a grant given since the
    sign-in reaches the token only then).

    Raises:
        NotAnOperator; and as `current_session`.
    """
    session = current_session(settings, session_file)
    refusal = operator_flow_refusal(flow, session.email, token_claims(session.access_token))
    if refusal is not None:
        session = current_session(settings, session_file, force_refresh=True)
        refusal = operator_flow_refusal(flow, session.email, token_claims(session.access_token))
    if refusal is not None:
        raise NotAnOperator(refusal)
    return session.access_token


def sealed_token_for_run(
    settings: OperatorSettings,
    *,
    flow: str,
    client_ids: Sequence[UUID | str] | None,
    parameters: Mapping[str, Any],
    ttl_s: int = 900,
    session_file: Path | str | None = None,
    now: float | None = None,
) -> str:
    """The signed-in user's access token sealed to the workers' public key for one run of
    `flow` with these clients and parameters (`tenantflow.sealing.seal_access_token`).

    A token of an operator flow whose claims lack the grant is refreshed once (a grant
    given since the sign-in reaches the token only then) before it is refused.

    Raises:
        PublicKeyMissing, SignedOut, SessionFileUnsafe, AuthUnreachable, NotAnOperator;
        ValueError: a parameter `seal_access_token` refuses (no secret in the message).
    """
    from tenantflow.sealing import seal_access_token

    public_key = load_public_key(settings)
    token = access_token_for_flow(settings, flow, session_file)
    return seal_access_token(
        token.get_secret_value(),
        public_key,
        flow=flow,
        client_ids=client_ids,
        parameters=parameters,
        ttl_s=ttl_s,
        now=now,
    )


# --- the operator grant (service-role key) ------------------------------------------------


def _find_user(admin: SyncGoTrueAdminAPI, email: str) -> Any:
    wanted = email.strip().lower()
    for user in _all_users(admin):
        if (user.email or "").lower() == wanted:
            return user
    raise OperatorSessionError(f"no user with email {email.strip()!r} in Supabase Auth")


def _all_users(admin: SyncGoTrueAdminAPI) -> Iterator[Any]:
    for page in range(1, _MAX_USER_PAGES + 1):
        users = admin.list_users(page=page, per_page=_USERS_PER_PAGE)
        yield from users
        if len(users) < _USERS_PER_PAGE:
            return


def _roles(user: Any) -> list[Any]:
    roles = (user.app_metadata or {}).get(OPERATOR_APP_METADATA_KEY)
    if roles is None:
        return []
    if not isinstance(roles, list):
        raise OperatorSessionError(
            f"app_metadata.{OPERATOR_APP_METADATA_KEY} of {user.email} is not a list: fix it "
            "by hand in Supabase first"
        )
    return list(roles)


def _set_operator(
    settings: OperatorSettings, service_role_key: SecretStr, email: str, *, grant: bool
) -> bool:
    try:
        with _admin_client(settings, service_role_key) as admin:
            user = _find_user(admin, email)
            roles = _roles(user)
            if (OPERATOR_ROLE in roles) == grant:
                return False
            if grant:
                roles.append(OPERATOR_ROLE)
            else:
                roles = [role for role in roles if role != OPERATOR_ROLE]
            # NOTE: Auth merges app_metadata key by key: only `roles` changes, and within it
            # every other role is kept.
            admin.update_user_by_id(
                str(user.id), {"app_metadata": {OPERATOR_APP_METADATA_KEY: roles}}
            )
    except _auth_errors() as error:
        raise _translated(error, settings, key="service_role") from None
    return True


def grant_operator(settings: OperatorSettings, service_role_key: SecretStr, email: str) -> bool:
    """Add `tenantflow_operator` to the user's `app_metadata.roles`; whether it changed."""
    return _set_operator(settings, service_role_key, email, grant=True)


def revoke_operator(settings: OperatorSettings, service_role_key: SecretStr, email: str) -> bool:
    """Remove `tenantflow_operator` from the user's `app_metadata.roles`; whether it changed.

    NOTE: access tokens issued before keep claiming the grant until they expire; the worker
    reads the grant again from `auth.users` for every run, so they no longer act as operator.
    """
    return _set_operator(settings, service_role_key, email, grant=False)


def list_operators(settings: OperatorSettings, service_role_key: SecretStr) -> list[str]:
    """The emails of the users whose `app_metadata.roles` holds `tenantflow_operator`."""
    try:
        with _admin_client(settings, service_role_key) as admin:
            return sorted(
                user.email or str(user.id)
                for user in _all_users(admin)
                if app_metadata_grants_operator(user.app_metadata)
            )
    except _auth_errors() as error:
        raise _translated(error, settings, key="service_role") from None
