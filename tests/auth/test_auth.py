"""`verify_access_token` against the stack's Auth stand-in, over HTTP, with real users.

Every bad token is refused with its own error; none of the errors carries the token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import pickle
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tenantflow.auth import (
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
    VerifiedClaims,
    app_metadata_grants_operator,
    verify_access_token,
)
from tenantflow.settings import Settings, SettingsError
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

pytestmark = pytest.mark.stack


def _b64(data: bytes | dict[str, Any]) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(header)}.{_b64(payload)}.{_b64(signature)}"


def resign(
    stack: Stack, token: str, *, headers: dict[str, Any] | None = None, **claims: Any
) -> str:
    """The token's claims with some changed (None removes one), signed by the stack's key."""
    changed = {**claims_of(token), **claims}
    return sign_token(
        stack.config, {k: v for k, v in changed.items() if v is not None}, headers=headers
    )


def hs256(payload: dict[str, Any], secret: bytes, header: dict[str, Any] | None = None) -> str:
    head = _b64(header or {"alg": "HS256", "typ": "JWT"})
    body = _b64(payload)
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


def current_public_pem(stack: Stack) -> tuple[str, bytes]:
    keys, current = load_signing_keys(stack.config)
    pem = (
        keys[current]
        .private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return current, pem


def assert_token_free(error: BaseException, *secrets: str) -> None:
    """Neither the message, the repr, the traceback nor the pickle holds a secret."""
    rendered = [
        str(error),
        repr(error),
        "".join(traceback.format_exception(error)),
    ]
    pickled = pickle.dumps(error)
    for secret in secrets:
        for text in rendered:
            assert secret not in text
        assert secret.encode() not in pickled
    # NOTE: a cause or context (an httpx error, a decoding error) could hold the request.
    assert error.__cause__ is None
    assert error.__context__ is None


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


async def test_a_secret_str_token_is_accepted(settings: Settings, token: str) -> None:
    from pydantic import SecretStr

    verified = await verify_access_token(SecretStr(token), settings=settings)
    assert verified.algorithm == "ES256"


async def test_leeway_applies_to_exp(stack: Stack, settings: Settings, token: str) -> None:
    just_expired = resign(stack, token, exp=now() - 5)
    assert (await verify_access_token(just_expired, settings=settings)).sub
    error = await refused(just_expired, with_(settings, auth_leeway_s=0))
    assert type(error) is TokenExpired


# --------------------------------------------------------------------------- refused

Case = Callable[[Stack, str], str]


def _attacker_key_token(stack: Stack, token: str, kid: str | None) -> str:
    """Signed with the attacker's own key, which the token's `jwk` header offers."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(attacker.public_key(), as_dict=True)
    current = load_signing_keys(stack.config)[1]
    return jwt.encode(
        claims_of(token),
        attacker,
        algorithm="ES256",
        headers={"kid": kid or current, "jwk": jwk, "jku": "https://attacker.example/jwks.json"},
    )


def _algorithm_confusion(stack: Stack, token: str) -> str:
    kid, pem = current_public_pem(stack)
    return hs256(claims_of(token), pem, {"alg": "HS256", "typ": "JWT", "kid": kid})


def _tampered(stack: Stack, token: str) -> str:
    header, _, signature = token.split(".")
    payload = {**claims_of(token), "sub": str(uuid.uuid4())}
    return f"{header}.{_b64(payload)}.{signature}"


CASES: dict[str, tuple[Case, type[AuthError]]] = {
    "expired": (
        lambda s, t: resign(s, t, exp=now() - 3600, iat=now() - 7200),
        TokenExpired,
    ),
    "nbf in the future": (lambda s, t: resign(s, t, nbf=now() + 3600), TokenNotYetValid),
    "iat in the future": (lambda s, t: resign(s, t, iat=now() + 3600), TokenNotYetValid),
    "wrong aud": (lambda s, t: resign(s, t, aud="someone-else"), InvalidAudience),
    "aud list without authenticated": (
        lambda s, t: resign(s, t, aud=["someone-else"]),
        InvalidAudience,
    ),
    "wrong iss": (
        lambda s, t: resign(s, t, iss="https://evil.supabase.co/auth/v1"),
        InvalidIssuer,
    ),
    "role anon": (lambda s, t: resign(s, t, role="anon"), InvalidRole),
    "role service_role with a sub": (lambda s, t: resign(s, t, role="service_role"), InvalidRole),
    "anon API key": (lambda s, t: s.config.secrets.anon_key, ApiKeyUsedAsToken),
    "service-role API key": (lambda s, t: s.config.secrets.service_role_key, ApiKeyUsedAsToken),
    "publishable API key": (
        lambda s, t: "sb_publishable_" + uuid.uuid4().hex,
        ApiKeyUsedAsToken,
    ),
    "sub not a UUID": (lambda s, t: resign(s, t, sub="admin"), InvalidSubject),
    "no sub": (lambda s, t: resign(s, t, sub=None), InvalidSubject),
    "no exp": (lambda s, t: resign(s, t, exp=None), MalformedToken),
    "is_anonymous not a boolean": (
        lambda s, t: resign(s, t, is_anonymous="false"),
        MalformedToken,
    ),
    "alg none": (
        lambda s, t: forge({"alg": "none", "typ": "JWT"}, claims_of(t)),
        DisallowedAlgorithm,
    ),
    "alg NONE": (lambda s, t: forge({"alg": "NONE"}, claims_of(t)), DisallowedAlgorithm),
    "no alg": (lambda s, t: forge({"typ": "JWT"}, claims_of(t), b"x"), DisallowedAlgorithm),
    "alg HS512": (
        lambda s, t: forge({"alg": "HS512", "typ": "JWT"}, claims_of(t), b"x" * 64),
        DisallowedAlgorithm,
    ),
    "alg RS256 on an ES256 key": (
        lambda s, t: forge(
            {"alg": "RS256", "typ": "JWT", "kid": load_signing_keys(s.config)[1]},
            claims_of(t),
            b"x" * 256,
        ),
        DisallowedAlgorithm,
    ),
    "HS256 signed with the public key": (_algorithm_confusion, AuthServiceRejected),
    "unknown kid": (
        lambda s, t: resign(s, t, headers={"kid": str(uuid.uuid4())}),
        UnknownSigningKey,
    ),
    "no kid": (
        lambda s, t: forge({"alg": "ES256", "typ": "JWT"}, claims_of(t), b"x" * 64),
        UnknownSigningKey,
    ),
    "attacker's jwk header, made-up kid": (
        lambda s, t: _attacker_key_token(s, t, str(uuid.uuid4())),
        UnknownSigningKey,
    ),
    "attacker's jwk header, real kid": (
        lambda s, t: _attacker_key_token(s, t, None),
        BadSignature,
    ),
    "tampered payload": (_tampered, BadSignature),
    "truncated": (lambda s, t: t[: len(t) // 2], MalformedToken),
    "truncated signature": (lambda s, t: t[:-10], BadSignature),
    "no signature": (lambda s, t: t.rsplit(".", 1)[0] + ".", BadSignature),
    "oversize": (lambda s, t: resign(s, t, user_metadata={"bio": "x" * 9000}), TokenTooLarge),
    "garbage": (lambda s, t: "not-a-token", MalformedToken),
    "garbage segments": (lambda s, t: "aaa.bbb.ccc", MalformedToken),
    "payload not JSON": (
        lambda s, t: f"{t.split('.')[0]}.{_b64(b'not json')}.{t.split('.')[2]}",
        MalformedToken,
    ),
    "Bearer prefix": (lambda s, t: "Bearer " + t, MalformedToken),
    "typ not JWT": (lambda s, t: resign(s, t, headers={"typ": "JWE"}), MalformedToken),
    "crit header": (lambda s, t: resign(s, t, headers={"crit": ["exp"]}), MalformedToken),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
async def test_each_bad_token_is_refused_with_its_own_error(
    stack: Stack, settings: Settings, token: str, case: str
) -> None:
    make, expected = CASES[case]
    bad = make(stack, token)

    error = await refused(bad, settings)

    assert type(error) is expected, f"{case}: {type(error).__name__}: {error}"
    assert_token_free(error, bad, token, stack.config.secrets.jwt_secret)
    assert error.message and error.code


async def test_algorithm_confusion_with_a_local_secret_is_a_bad_signature(
    stack: Stack, settings: Settings, token: str
) -> None:
    local = with_(settings, supabase_jwt_secret=stack.config.secrets.jwt_secret)
    bad = _algorithm_confusion(stack, token)
    error = await refused(bad, local)
    assert type(error) is BadSignature
    assert_token_free(error, bad, stack.config.secrets.jwt_secret)


async def test_the_anon_key_is_refused_with_a_local_secret_too(
    stack: Stack, settings: Settings
) -> None:
    local = with_(settings, supabase_jwt_secret=stack.config.secrets.jwt_secret)
    error = await refused(stack.config.secrets.anon_key, local)
    assert type(error) is ApiKeyUsedAsToken
    assert "anon" in str(error)


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


def test_the_jwks_cache_time_is_capped_at_ten_minutes(settings: Settings) -> None:
    with pytest.raises(SettingsError, match="AUTH_JWKS_CACHE_S"):
        with_(settings, auth_jwks_cache_s=601)


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


@pytest.mark.parametrize(
    ("app_metadata", "granted"),
    [
        ({"provider": "email", "roles": ["tenantflow_operator"]}, True),
        ('{"roles": ["viewer", "tenantflow_operator"]}', True),  # raw jsonb text
        ({"roles": "tenantflow_operator"}, False),  # a list, or nothing
        ({"role": ["tenantflow_operator"]}, False),
        ({"roles": []}, False),
        ("not json", False),
        (None, False),
    ],
)
def test_the_operator_grant_is_read_from_app_metadata_roles(
    app_metadata: dict[str, Any] | str | None, granted: bool
) -> None:
    assert app_metadata_grants_operator(app_metadata) is granted
