"""The project's signing keys (JWKS): fetched, cached, refetched by rule, kept on disk.

A `JwksCache` holds the key sets it has fetched, one per JWKS URL
(`SUPABASE_URL/auth/v1/.well-known/jwks.json`), and answers `signing_key(settings, kid)`:

- a key set is trusted at most `AUTH_JWKS_CACHE_S` (≤ 600 s);
- an unknown `kid` causes one refetch, but never more often than every
  `AUTH_JWKS_MIN_REFETCH_INTERVAL_S`, and neither does a fetch after a failed one;
- concurrent callers share one fetch (single flight), whatever their event loop or thread;
- a fetched key set is also written to `AUTH_JWKS_CACHE_DIR`, and read from there by a cache
  that has none yet (a new flow-run process), under the same age limit.

The cache is a plain dict guarded by a `threading.Lock`, with no event-loop-bound object in
it: Prefect runs tasks on several loops in several threads, and each fetch opens its own
`httpx.AsyncClient`. How a key set is fetched is the cache's `fetch` callable (by default
`fetch_jwks()`, over HTTP), so a test can hand one over directly.

Only asymmetric keys are taken from a key set: EC P-256 (ES256) and RSA of at least 2048 bits
(RS256), each bound to that one algorithm (or to the JWK's `alg` if it says so).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tenantflow.auth.errors import AuthServiceUnavailable, UnknownSigningKey
from tenantflow.auth.tokens import VerificationKey, json_object, shown
from tenantflow.settings import Settings, get_settings

__all__ = [
    "MAX_JWKS_BYTES",
    "JwksCache",
    "JwksFetcher",
    "fetch_jwks",
    "jwks_url",
    "keys_of",
    "verification_key",
]

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 256 * 1024
_MIN_RSA_BITS = 2048

#: Fetches the JWK set of `settings`' project: the parsed JSON document, with its `keys`.
#: Raises `AuthServiceUnavailable` when it cannot.
JwksFetcher = Callable[[Settings], Awaitable[Mapping[str, Any]]]


def jwks_url(settings: Settings) -> str:
    return f"{settings.supabase_url}/auth/v1/.well-known/jwks.json"


def verification_key(jwk: Any) -> VerificationKey | None:
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
            return VerificationKey(kid, "ES256", ECAlgorithm.from_jwk(public))
        if kty == "RSA" and alg in (None, "RS256"):
            key = RSAAlgorithm.from_jwk({k: jwk[k] for k in ("kty", "n", "e")})
            if getattr(key, "key_size", 0) < _MIN_RSA_BITS:
                return None
            return VerificationKey(kid, "RS256", key)
    except (KeyError, ValueError, TypeError) as error:  # jwt.InvalidKeyError is a ValueError
        log.warning("skipping JWKS key %s: %s", shown(kid), type(error).__name__)
        return None
    # NOTE: symmetric ("oct") keys are never taken from a JWKS, and unknown types are skipped.
    return None


def keys_of(document: Mapping[str, Any] | None) -> dict[str, VerificationKey] | None:
    """The usable keys of a JWK set by `kid`, or None when `document` is not a JWK set."""
    keys = document.get("keys") if document is not None else None
    if not isinstance(keys, list):
        return None
    parsed = [key for key in map(verification_key, keys) if key is not None]
    return {key.kid: key for key in parsed}


async def fetch_jwks(settings: Settings) -> Mapping[str, Any]:
    """`GET SUPABASE_URL/auth/v1/.well-known/jwks.json`: the default `JwksFetcher`."""
    # NOTE: httpx is imported here, on the slow path only: most flow-run processes find the
    # keys in the disk cache and never fetch, and every process pays for its imports.
    import httpx

    from tenantflow.auth.supabase import tls_context

    url = jwks_url(settings)
    failure: str | None = None
    try:
        async with httpx.AsyncClient(
            timeout=settings.auth_http_timeout_s, follow_redirects=False, verify=tls_context()
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
    document = json_object(response.content if len(response.content) <= MAX_JWKS_BYTES else None)
    if document is None:
        raise AuthServiceUnavailable(f"{url} did not answer a JWK set")
    return document


# --------------------------------------------------------------------------- disk copy


def _disk_cache(settings: Settings) -> Path | None:
    folder = settings.auth_jwks_cache_dir
    if folder is None:
        return None
    digest = hashlib.sha256(jwks_url(settings).encode()).hexdigest()[:16]
    return folder / f"jwks-{digest}.json"


def _load_disk_cache(settings: Settings) -> tuple[dict[str, VerificationKey], float] | None:
    """Keys another process of this worker fetched, with their age, if young enough.

    NOTE: the key set is public; the file only spares Supabase Auth a fetch per flow-run
    process, and keeps runs going while Auth is briefly unreachable. It is trusted no
    longer than AUTH_JWKS_CACHE_S, like the memory cache.
    """
    path = _disk_cache(settings)
    try:
        if path is None or path.stat().st_size > MAX_JWKS_BYTES:
            return None
        document = json_object(path.read_bytes())
    except OSError:
        return None
    fetched = document.get("fetched_at") if document is not None else None
    if not isinstance(fetched, int | float):
        return None
    age = time.time() - fetched
    keys = keys_of(document)
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


# --------------------------------------------------------------------------- the cache


@dataclass
class _JwksState:
    keys: dict[str, VerificationKey] | None = None
    fetched_at: float = -math.inf
    attempted_at: float = -math.inf
    last_failed: bool = False
    inflight: concurrent.futures.Future[None] | None = None


class JwksCache:
    """Key sets by JWKS URL, fetched with `fetch` (default: `fetch_jwks`, over HTTP).

    One instance serves any number of event loops and threads. `verify_access_token()` uses
    one default instance unless it is given another; tests make their own.
    """

    def __init__(self, fetch: JwksFetcher | None = None) -> None:
        self._fetch: JwksFetcher = fetch or fetch_jwks
        # NOTE: keyed by JWKS URL; holds no event-loop-bound object, so any loop in any thread
        # may use it. The lock is held only for bookkeeping, never across an await.
        self._states: dict[str, _JwksState] = {}
        self._lock = threading.Lock()

    def clear(self, settings: Settings | None = None) -> None:
        """Forget every cached key set, in memory and in the cache folder of `settings`
        (default: the process settings, if they load). For tests, or after a key rotation."""
        with self._lock:
            self._states.clear()
        try:
            folder = (settings or get_settings()).auth_jwks_cache_dir
        except Exception:
            return
        if folder is not None:
            for path in folder.glob("jwks-*.json"):
                path.unlink(missing_ok=True)

    async def signing_key(self, settings: Settings, kid: str) -> VerificationKey:
        """The JWKS key named `kid`: from the cache, or after one (rate-limited) fetch.

        Concurrent callers share one fetch (single flight), whatever their event loop.
        """
        url = jwks_url(settings)
        for _ in range(3):
            now = time.monotonic()
            with self._lock:
                state = self._states.setdefault(url, _JwksState())
                if state.keys is None and state.inflight is None:
                    cached = _load_disk_cache(settings)
                    if cached is not None:
                        state.keys, state.fetched_at = cached[0], now - cached[1]
                wait = state.inflight
                if wait is None:
                    fresh = (
                        state.keys is not None
                        and now - state.fetched_at < settings.auth_jwks_cache_s
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
                            f"no signing key has id {shown(kid)} (the key set was fetched "
                            "moments ago and is not fetched again yet)"
                        )
                    fetch: concurrent.futures.Future[None] = concurrent.futures.Future()
                    fetch.set_running_or_notify_cancel()  # waiters cannot cancel it
                    state.inflight, state.attempted_at = fetch, now
            if wait is not None:
                # NOTE: another task (any loop, any thread) is fetching: wait, then look again.
                await asyncio.wrap_future(wait)
                continue
            return await self._refresh(settings, state, fetch, kid)
        raise UnknownSigningKey(f"no signing key of the project has id {shown(kid)}")

    async def _fetch_keys(self, settings: Settings) -> dict[str, VerificationKey]:
        url = jwks_url(settings)
        document = await self._fetch(settings)
        keys = keys_of(document)
        if keys is None:
            raise AuthServiceUnavailable(f"{url} did not answer a JWK set")
        log.info("fetched %d signing key(s) from %s", len(keys), url)
        _save_disk_cache(settings, document["keys"])
        return keys

    async def _refresh(
        self,
        settings: Settings,
        state: _JwksState,
        fetch: concurrent.futures.Future[None],
        kid: str,
    ) -> VerificationKey:
        keys: dict[str, VerificationKey] | None = None
        failure: AuthServiceUnavailable | None = None
        try:
            keys = await self._fetch_keys(settings)
        except AuthServiceUnavailable as error:
            failure = error
        finally:
            with self._lock:
                state.inflight = None
                if keys is not None:
                    state.keys, state.fetched_at, state.last_failed = (
                        keys,
                        time.monotonic(),
                        False,
                    )
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
            raise UnknownSigningKey(f"no signing key of the project has id {shown(kid)}")
        return keys[kid]
