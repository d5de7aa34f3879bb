"""`verify_access_token` against the stack's Auth stand-in, over HTTP, with real users.

What needs the stand-in: its minted tokens, the JWKS fetched over HTTP (refetch, rotation,
flood, many loops), Supabase Auth's answers (strict mode, legacy HS256) and its outage. The
table of bad tokens runs without the stack, in `tests/unit/test_tokens.py`; none of the
errors carries the token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tenantflow.auth import (
    AnonymousNotAllowed,
    AuthConfigurationError,
    AuthError,
    AuthServiceRejected,
    AuthServiceUnavailable,
    BadSignature,
    DisallowedAlgorithm,
    SessionNotFound,
    TokenExpired,
    UnknownSigningKey,
    UserNotFound,
    VerifiedClaims,
    verify_access_token,
)
from tenantflow.settings import Settings
from tenantflow_dev import Stack, StackConfig
from tenantflow_dev.auth_stand_in import (
    add_signing_key,
    create_user,
    delete_user,
    load_signing_keys,
    mint_access_token,
    remove_signing_key,
    sign_token,
)
from tests.auth.support import StackUser, claims_of, stand_in_counts, with_
from tests.forging import assert_token_free, forge, hs256

pytestmark = pytest.mark.stack


def resign(
    stack: Stack, token: str, *, headers: dict[str, Any] | None = None, **claims: Any
) -> str:
    """The token's claims with some changed (None removes one), signed by the stack's key."""
    changed = {**claims_of(token), **claims}
    return sign_token(
        stack.config, {k: v for k, v in changed.items() if v is not None}, headers=headers
    )


def current_public_pem(stack: Stack) -> tuple[str, bytes]:
    keys, current = load_signing_keys(stack.config)
    pem = (
        keys[current]
        .private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return current, pem


async def refused(token: str, settings: Settings, **options: Any) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await verify_access_token(token, settings=settings, **options)
    return caught.value


def now() -> int:
    return int(time.time())


# --------------------------------------------------------------------------- accepted


async def test_a_minted_token_is_accepted_with_its_claims(
    stack: Stack, settings: Settings, user: StackUser, token: str
) -> None:
    verified = await verify_access_token(token, settings=settings)

    assert isinstance(verified, VerifiedClaims)
    assert verified.sub == user.id
    assert verified.email == user.email
    assert verified.role == "authenticated"
    assert verified.aal == "aal1"
    assert verified.algorithm == "ES256"
    assert verified.session_id == uuid.UUID(claims_of(token)["session_id"])
    assert verified.is_anonymous is False
    assert verified.checked_with_auth is False
    assert verified.app_metadata == {"provider": "email", "providers": ["email"]}
    assert json.loads(verified.claims_json()) == claims_of(token)
    assert token not in repr(verified)


async def test_strict_mode_also_asks_supabase_auth(
    stack: Stack, private_stand_in: StackConfig, counted_settings: Settings, counted_token: str
) -> None:
    before = stand_in_counts(private_stand_in)["user"]
    verified = await verify_access_token(
        counted_token, settings=with_(counted_settings, auth_strict=True)
    )
    assert verified.checked_with_auth is True
    assert stand_in_counts(private_stand_in)["user"] == before + 1


# --------------------------------------------------------------------------- refused


def _algorithm_confusion(stack: Stack, token: str) -> str:
    kid, pem = current_public_pem(stack)
    return hs256(claims_of(token), pem, {"alg": "HS256", "typ": "JWT", "kid": kid})


async def test_algorithm_confusion_without_the_secret_is_refused_by_supabase_auth(
    stack: Stack, settings: Settings, token: str
) -> None:
    bad = _algorithm_confusion(stack, token)

    error = await refused(bad, settings)

    assert type(error) is AuthServiceRejected
    assert_token_free(error, bad, token, stack.config.secrets.jwt_secret)
    assert error.message and error.code


async def test_anonymous_sign_ins_are_refused_unless_allowed(
    stack: Stack, settings: Settings, anonymous_user: StackUser
) -> None:
    token = await mint_access_token(stack.config, anonymous_user.email)
    error = await refused(token, settings)
    assert type(error) is AnonymousNotAllowed

    verified = await verify_access_token(token, settings=settings, allow_anonymous=True)
    assert verified.is_anonymous is True
    assert verified.sub == anonymous_user.id


# --------------------------------------------------------------------------- Supabase Auth


async def test_a_deleted_user_is_refused_in_strict_mode(stack: Stack, settings: Settings) -> None:
    email = f"auth-test-{uuid.uuid4().hex[:10]}@example.test"
    await create_user(stack.config, email)
    token = await mint_access_token(stack.config, email)
    await verify_access_token(token, settings=settings)
    assert await delete_user(stack.config, email)

    # NOTE: the local check alone cannot know; that is what strict mode is for.
    assert (await verify_access_token(token, settings=settings)).checked_with_auth is False
    error = await refused(token, with_(settings, auth_strict=True))
    assert type(error) is UserNotFound
    assert error.error_code == "user_not_found"
    assert_token_free(error, token)


async def test_a_signed_out_session_is_refused_in_strict_mode(
    stack: Stack, settings: Settings, token: str
) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(
            f"{stack.config.supabase_url}/auth/v1/logout",
            headers={"apikey": stack.config.secrets.anon_key, "Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 204

    assert (await verify_access_token(token, settings=settings)).checked_with_auth is False
    error = await refused(token, settings, strict=True)
    assert type(error) is SessionNotFound
    assert_token_free(error, token)


async def test_hs256_is_verified_locally_when_the_jwt_secret_is_set(
    stack: Stack, private_stand_in: StackConfig, counted_settings: Settings, user: StackUser
) -> None:
    local = with_(counted_settings, supabase_jwt_secret=stack.config.secrets.jwt_secret)
    token = await mint_access_token(private_stand_in, user.email, algorithm="HS256")
    before = stand_in_counts(private_stand_in)["user"]

    verified = await verify_access_token(token, settings=local)
    assert (verified.algorithm, verified.checked_with_auth, verified.sub) == (
        "HS256",
        False,
        user.id,
    )

    forged = hs256(claims_of(token), b"not-the-secret-" * 4)
    error = await refused(forged, local)
    assert type(error) is BadSignature
    assert stand_in_counts(private_stand_in)["user"] == before  # Auth was never asked
    assert_token_free(error, forged, stack.config.secrets.jwt_secret)


async def test_hs256_is_checked_by_supabase_auth_without_the_secret(
    stack: Stack, private_stand_in: StackConfig, counted_settings: Settings, user: StackUser
) -> None:
    assert counted_settings.supabase_jwt_secret is None
    token = await mint_access_token(private_stand_in, user.email, algorithm="HS256")
    before = stand_in_counts(private_stand_in)["user"]

    verified = await verify_access_token(token, settings=counted_settings)
    assert (verified.algorithm, verified.checked_with_auth, verified.sub) == (
        "HS256",
        True,
        user.id,
    )
    assert stand_in_counts(private_stand_in)["user"] == before + 1

    forged = hs256(claims_of(token), b"not-the-secret-" * 4)
    error = await refused(forged, counted_settings)
    assert isinstance(error, AuthServiceRejected)
    assert error.error_code == "bad_jwt"
    assert_token_free(error, forged)

    # Claims are still ours to check: an expired one never reaches Auth.
    expired = hs256(
        {**claims_of(token), "exp": now() - 3600}, stack.config.secrets.jwt_secret.encode()
    )
    calls = stand_in_counts(private_stand_in)["user"]
    assert type(await refused(expired, counted_settings)) is TokenExpired
    assert stand_in_counts(private_stand_in)["user"] == calls


async def test_a_wrong_anon_key_is_a_configuration_error(
    stack: Stack, settings: Settings, token: str
) -> None:
    wrong = with_(settings, supabase_anon_key="not-the-anon-key", auth_strict=True)
    error = await refused(token, wrong)
    assert type(error) is AuthConfigurationError
    assert "SUPABASE_ANON_KEY" in str(error)


async def test_an_unreachable_auth_is_unavailable_and_not_hammered(
    settings: Settings, token: str
) -> None:
    unreachable = with_(settings, supabase_url="http://127.0.0.1:9", auth_http_timeout_s=1)
    first = await refused(token, unreachable)
    assert type(first) is AuthServiceUnavailable
    assert_token_free(first, token)
    started = time.monotonic()
    second = await refused(token, unreachable)
    assert type(second) is AuthServiceUnavailable
    assert "moments ago" in str(second)
    assert time.monotonic() - started < 0.05  # refused from the failure backoff, no new call


# --------------------------------------------------------------------------- keys


async def test_a_token_of_a_newly_added_key_is_accepted_after_one_refetch(
    stack: Stack,
    private_stand_in: StackConfig,
    counted_settings: Settings,
    user: StackUser,
    counted_token: str,
) -> None:
    fast = with_(counted_settings, auth_jwks_min_refetch_interval_s=1.0)
    await verify_access_token(counted_token, settings=fast)  # the key set is now cached
    kid = add_signing_key(stack.config)
    try:
        rotated = await mint_access_token(private_stand_in, user.email, kid=kid)
        fetches = stand_in_counts(private_stand_in)["jwks"]

        # Within the refetch interval an unknown kid is refused without a fetch...
        assert type(await refused(rotated, fast)) is UnknownSigningKey
        assert stand_in_counts(private_stand_in)["jwks"] == fetches

        # ... after it, one fetch picks the new key up.
        await asyncio.sleep(1.05)
        verified = await verify_access_token(rotated, settings=fast)
        assert verified.key_id == kid
        assert stand_in_counts(private_stand_in)["jwks"] == fetches + 1
        await verify_access_token(rotated, settings=fast)
        await verify_access_token(counted_token, settings=fast)
        assert stand_in_counts(private_stand_in)["jwks"] == fetches + 1
    finally:
        remove_signing_key(stack.config, kid)


async def test_rs256_keys_are_accepted_with_their_own_algorithm(
    stack: Stack, settings: Settings, user: StackUser
) -> None:
    kid = add_signing_key(stack.config, "RS256")
    try:
        token = await mint_access_token(stack.config, user.email, kid=kid)
        assert jwt.get_unverified_header(token)["alg"] == "RS256"
        verified = await verify_access_token(token, settings=settings)
        assert (verified.algorithm, verified.key_id) == ("RS256", kid)

        # An RS256 key never verifies an ES256-labelled token.
        relabelled = forge({"alg": "ES256", "kid": kid}, claims_of(token), b"x" * 64)
        assert type(await refused(relabelled, settings)) is DisallowedAlgorithm
    finally:
        remove_signing_key(stack.config, kid)


async def test_a_token_of_a_removed_key_is_refused_once_the_cache_expires(
    stack: Stack, settings: Settings, user: StackUser
) -> None:
    short = with_(settings, auth_jwks_cache_s=1.0)
    kid = add_signing_key(stack.config)
    try:
        token = await mint_access_token(stack.config, user.email, kid=kid)
        await verify_access_token(token, settings=short)
    finally:
        remove_signing_key(stack.config, kid)

    # Still cached: a removed key is trusted for at most the cache time.
    await verify_access_token(token, settings=short)
    await asyncio.sleep(1.05)
    error = await refused(token, short)
    assert type(error) is UnknownSigningKey


async def test_a_flood_of_made_up_kids_fetches_the_jwks_at_most_once(
    stack: Stack, private_stand_in: StackConfig, counted_settings: Settings, counted_token: str
) -> None:
    forged = [resign(stack, counted_token, headers={"kid": str(uuid.uuid4())}) for _ in range(50)]
    before = stand_in_counts(private_stand_in)["jwks"]

    results = await asyncio.gather(
        *(verify_access_token(bad, settings=counted_settings) for bad in forged),
        return_exceptions=True,
    )
    later = [await refused(bad, counted_settings) for bad in forged[:10]]

    assert all(type(result) is UnknownSigningKey for result in [*results, *later])
    assert stand_in_counts(private_stand_in)["jwks"] - before == 1
    # The real key still works from the cache.
    await verify_access_token(counted_token, settings=counted_settings)
    assert stand_in_counts(private_stand_in)["jwks"] - before == 1


def test_verification_from_many_event_loops_shares_one_cache(
    stack: Stack, private_stand_in: StackConfig, counted_settings: Settings, counted_token: str
) -> None:
    """Prefect runs tasks on new loops in pool threads: the cache must work across them."""
    before = stand_in_counts(private_stand_in)["jwks"]

    def verify_on_a_new_loop(_: int) -> VerifiedClaims:
        return asyncio.run(verify_access_token(counted_token, settings=counted_settings))

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(verify_on_a_new_loop, range(24)))

    assert {result.sub for result in results} == {uuid.UUID(claims_of(counted_token)["sub"])}
    assert stand_in_counts(private_stand_in)["jwks"] - before == 1


def test_the_stand_in_never_logs_a_token(stack: Stack) -> None:
    log = (stack.config.stack_dir / "auth" / "server.log").read_text(errors="replace")
    assert "eyJ" not in log
