"""`verify_access_token` without the stack: tokens signed with keys made here, and a
`JwksCache` handed their key set directly (no HTTP server, no Supabase Auth).

Every bad token is refused with its own error; none of the errors carries the token.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from pydantic import SecretStr

from tenantflow.auth import (
    AnonymousNotAllowed,
    ApiKeyUsedAsToken,
    AuthError,
    BadSignature,
    DisallowedAlgorithm,
    InvalidAudience,
    InvalidIssuer,
    InvalidRole,
    InvalidSubject,
    JwksCache,
    MalformedToken,
    TokenExpired,
    TokenNotYetValid,
    TokenTooLarge,
    UnknownSigningKey,
    VerifiedClaims,
    app_metadata_grants_operator,
    verify_access_token,
)
from tenantflow.settings import Settings, SettingsError, load_settings
from tests.forging import assert_token_free, b64, forge, hs256

# NOTE: `.invalid` never resolves: a check that tried to reach Supabase Auth would fail
# loudly instead of asking someone's running stack.
SUPABASE_URL = "https://tokens-unit-test.invalid"
ISSUER = f"{SUPABASE_URL}/auth/v1"
JWT_SECRET = "unit-test-jwt-secret-with-at-least-32-characters"
REF = "abcdefghijklmnopqrst"
POOLER = "aws-0-eu-central-1.pooler.supabase.com"

KEY = ec.generate_private_key(ec.SECP256R1())
KID = "unit-es256"
JWKS = {
    "keys": [
        {
            **ECAlgorithm.to_jwk(KEY.public_key(), as_dict=True),
            "kid": KID,
            "alg": "ES256",
            "use": "sig",
        }
    ]
}


def settings_of(**changes: Any) -> Settings:
    return load_settings(
        _env_file=None,
        **{
            "database_url": f"postgresql://tenantflow_worker.{REF}:pw@{POOLER}:6543/postgres",
            "migration_database_url": f"postgresql://postgres.{REF}:pw@{POOLER}:5432/postgres",
            "supabase_url": SUPABASE_URL,
            "supabase_anon_key": "anon-key-value",
            "supabase_jwt_secret": None,
            "auth_strict": False,
            "auth_leeway_s": 10.0,
            "auth_jwks_cache_s": 600.0,
            "auth_jwks_min_refetch_interval_s": 30.0,
            "auth_max_token_bytes": 8192,
            "auth_jwks_cache_dir": None,
            **changes,
        },
    )


class ServedJwks:
    """A `JwksFetcher` that hands over `document` and counts how often it was asked."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        self.fetches = 0

    async def __call__(self, settings: Settings) -> Mapping[str, Any]:
        self.fetches += 1
        return self.document


@pytest.fixture
def settings() -> Settings:
    return settings_of()


@pytest.fixture
def served() -> ServedJwks:
    return ServedJwks(JWKS)


@pytest.fixture
def jwks(served: ServedJwks) -> JwksCache:
    return JwksCache(fetch=served)


def now() -> int:
    return int(time.time())


def supabase_claims(**changes: Any) -> dict[str, Any]:
    """The claims Supabase Auth puts in a user's access token (None removes one)."""
    issued = now()
    claims = {
        "aud": "authenticated",
        "exp": issued + 3600,
        "iat": issued,
        "iss": ISSUER,
        "sub": str(uuid.uuid4()),
        "email": "someone@example.test",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": issued}],
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
        **changes,
    }
    return {k: v for k, v in claims.items() if v is not None}


def sign(claims: dict[str, Any], *, headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, KEY, algorithm="ES256", headers={"kid": KID, **(headers or {})})


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def resign(token: str, *, headers: dict[str, Any] | None = None, **claims: Any) -> str:
    """The token's claims with some changed (None removes one), signed by the project key."""
    changed = {**claims_of(token), **claims}
    return sign({k: v for k, v in changed.items() if v is not None}, headers=headers)


def api_key(role: str) -> str:
    """A legacy project API key: HS256 under the JWT secret, no `sub`."""
    issued = now()
    claims = {"iss": "supabase-demo", "role": role, "iat": issued, "exp": issued + 10 * 365 * 86400}
    return hs256(claims, JWT_SECRET.encode())


def public_pem() -> bytes:
    return KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def token() -> str:
    """A valid ES256 access token signed by the project key."""
    return sign(supabase_claims())


async def refused(
    token: str | SecretStr, settings: Settings, jwks: JwksCache, **options: Any
) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await verify_access_token(token, settings=settings, jwks=jwks, **options)
    return caught.value


# --------------------------------------------------------------------------- accepted


async def test_a_signed_token_is_accepted_with_its_claims(
    settings: Settings, jwks: JwksCache, served: ServedJwks, token: str
) -> None:
    verified = await verify_access_token(token, settings=settings, jwks=jwks)

    claims = claims_of(token)
    assert isinstance(verified, VerifiedClaims)
    assert verified.sub == uuid.UUID(claims["sub"])
    assert verified.email == "someone@example.test"
    assert verified.phone is None
    assert (verified.role, verified.aal, verified.algorithm) == ("authenticated", "aal1", "ES256")
    assert verified.key_id == KID
    assert verified.session_id == uuid.UUID(claims["session_id"])
    assert verified.is_anonymous is False
    assert verified.checked_with_auth is False
    assert verified.app_metadata == {"provider": "email", "providers": ["email"]}
    assert verified.expires_at.timestamp() == claims["exp"]
    assert verified.claims == claims
    assert token not in repr(verified)
    assert served.fetches == 1


async def test_a_secret_str_token_is_accepted(
    settings: Settings, jwks: JwksCache, token: str
) -> None:
    verified = await verify_access_token(SecretStr(token), settings=settings, jwks=jwks)
    assert verified.algorithm == "ES256"


async def test_leeway_applies_to_exp(settings: Settings, jwks: JwksCache, token: str) -> None:
    just_expired = resign(token, exp=now() - 5)
    assert (await verify_access_token(just_expired, settings=settings, jwks=jwks)).sub
    error = await refused(just_expired, settings_of(auth_leeway_s=0), jwks)
    assert type(error) is TokenExpired


async def test_hs256_is_verified_locally_with_the_jwt_secret(jwks: JwksCache) -> None:
    local = settings_of(supabase_jwt_secret=JWT_SECRET)
    token = hs256(supabase_claims(), JWT_SECRET.encode())

    verified = await verify_access_token(token, settings=local, jwks=jwks)
    assert (verified.algorithm, verified.key_id, verified.checked_with_auth) == (
        "HS256",
        None,
        False,
    )


# --------------------------------------------------------------------------- refused

Make = Callable[[str], str]


class Case(NamedTuple):
    make: Make
    expected: type[AuthError]
    settings: dict[str, Any] | None = None


def _attacker_key_token(token: str, kid: str) -> str:
    """Signed with the attacker's own key, which the token's `jwk` header offers."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(attacker.public_key(), as_dict=True)
    return jwt.encode(
        claims_of(token),
        attacker,
        algorithm="ES256",
        headers={"kid": kid, "jwk": jwk, "jku": "https://attacker.example/jwks.json"},
    )


def _algorithm_confusion(token: str) -> str:
    """HS256 with the project's public key (PEM) as the secret, naming the ES256 key."""
    return hs256(claims_of(token), public_pem(), {"alg": "HS256", "typ": "JWT", "kid": KID})


def _tampered(token: str) -> str:
    header, _, signature = token.split(".")
    payload = {**claims_of(token), "sub": str(uuid.uuid4())}
    return f"{header}.{b64(payload)}.{signature}"


CASES: dict[str, Case] = {
    "expired": Case(lambda t: resign(t, exp=now() - 3600, iat=now() - 7200), TokenExpired),
    "nbf in the future": Case(lambda t: resign(t, nbf=now() + 3600), TokenNotYetValid),
    "iat in the future": Case(lambda t: resign(t, iat=now() + 3600), TokenNotYetValid),
    "wrong aud": Case(lambda t: resign(t, aud="someone-else"), InvalidAudience),
    "aud list without authenticated": Case(
        lambda t: resign(t, aud=["someone-else"]), InvalidAudience
    ),
    "wrong iss": Case(lambda t: resign(t, iss="https://evil.supabase.co/auth/v1"), InvalidIssuer),
    "role anon": Case(lambda t: resign(t, role="anon"), InvalidRole),
    "role service_role with a sub": Case(lambda t: resign(t, role="service_role"), InvalidRole),
    "anon API key": Case(lambda t: api_key("anon"), ApiKeyUsedAsToken),
    "service-role API key": Case(lambda t: api_key("service_role"), ApiKeyUsedAsToken),
    "publishable API key": Case(lambda t: "sb_publishable_" + uuid.uuid4().hex, ApiKeyUsedAsToken),
    "sub not a UUID": Case(lambda t: resign(t, sub="admin"), InvalidSubject),
    "no sub": Case(lambda t: resign(t, sub=None), InvalidSubject),
    "no exp": Case(lambda t: resign(t, exp=None), MalformedToken),
    "is_anonymous not a boolean": Case(lambda t: resign(t, is_anonymous="false"), MalformedToken),
    "alg none": Case(
        lambda t: forge({"alg": "none", "typ": "JWT"}, claims_of(t)), DisallowedAlgorithm
    ),
    "alg NONE": Case(lambda t: forge({"alg": "NONE"}, claims_of(t)), DisallowedAlgorithm),
    "no alg": Case(lambda t: forge({"typ": "JWT"}, claims_of(t), b"x"), DisallowedAlgorithm),
    "alg HS512": Case(
        lambda t: forge({"alg": "HS512", "typ": "JWT"}, claims_of(t), b"x" * 64),
        DisallowedAlgorithm,
    ),
    "alg RS256 on an ES256 key": Case(
        lambda t: forge({"alg": "RS256", "typ": "JWT", "kid": KID}, claims_of(t), b"x" * 256),
        DisallowedAlgorithm,
    ),
    # NOTE: without the JWT secret, Supabase Auth judges HS256 tokens: tests/auth covers that.
    "HS256 signed with the public key": Case(
        _algorithm_confusion, BadSignature, {"supabase_jwt_secret": JWT_SECRET}
    ),
    "unknown kid": Case(lambda t: resign(t, headers={"kid": str(uuid.uuid4())}), UnknownSigningKey),
    "no kid": Case(
        lambda t: forge({"alg": "ES256", "typ": "JWT"}, claims_of(t), b"x" * 64),
        UnknownSigningKey,
    ),
    "attacker's jwk header, made-up kid": Case(
        lambda t: _attacker_key_token(t, str(uuid.uuid4())), UnknownSigningKey
    ),
    "attacker's jwk header, real kid": Case(lambda t: _attacker_key_token(t, KID), BadSignature),
    "tampered payload": Case(_tampered, BadSignature),
    "truncated": Case(lambda t: t[: len(t) // 2], MalformedToken),
    "truncated signature": Case(lambda t: t[:-10], BadSignature),
    "no signature": Case(lambda t: t.rsplit(".", 1)[0] + ".", BadSignature),
    "oversize": Case(lambda t: resign(t, user_metadata={"bio": "x" * 9000}), TokenTooLarge),
    "garbage": Case(lambda t: "not-a-token", MalformedToken),
    "garbage segments": Case(lambda t: "aaa.bbb.ccc", MalformedToken),
    "payload not JSON": Case(
        lambda t: f"{t.split('.')[0]}.{b64(b'not json')}.{t.split('.')[2]}", MalformedToken
    ),
    "Bearer prefix": Case(lambda t: "Bearer " + t, MalformedToken),
    "typ not JWT": Case(lambda t: resign(t, headers={"typ": "JWE"}), MalformedToken),
    "crit header": Case(lambda t: resign(t, headers={"crit": ["exp"]}), MalformedToken),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
async def test_each_bad_token_is_refused_with_its_own_error(
    jwks: JwksCache, token: str, case: str
) -> None:
    make, expected, changes = CASES[case]
    bad = make(token)

    error = await refused(bad, settings_of(**(changes or {})), jwks)

    assert type(error) is expected, f"{case}: {type(error).__name__}: {error}"
    assert_token_free(error, bad, token, JWT_SECRET)
    assert error.message and error.code


@pytest.mark.parametrize("empty", ["", SecretStr("")], ids=["str", "SecretStr"])
async def test_no_token_at_all_is_malformed(
    settings: Settings, jwks: JwksCache, empty: str | SecretStr
) -> None:
    error = await refused(empty, settings, jwks)
    assert type(error) is MalformedToken
    assert "no access token" in str(error)


async def test_algorithm_confusion_with_a_local_secret_is_a_bad_signature(
    jwks: JwksCache, token: str
) -> None:
    local = settings_of(supabase_jwt_secret=JWT_SECRET)
    bad = _algorithm_confusion(token)
    error = await refused(bad, local, jwks)
    assert type(error) is BadSignature
    assert_token_free(error, bad, JWT_SECRET)


async def test_the_anon_key_is_refused_with_a_local_secret_too(jwks: JwksCache) -> None:
    local = settings_of(supabase_jwt_secret=JWT_SECRET)
    error = await refused(api_key("anon"), local, jwks)
    assert type(error) is ApiKeyUsedAsToken
    assert "anon" in str(error)


async def test_anonymous_sign_ins_are_refused_unless_allowed(
    settings: Settings, jwks: JwksCache
) -> None:
    token = sign(supabase_claims(is_anonymous=True, email=""))
    error = await refused(token, settings, jwks)
    assert type(error) is AnonymousNotAllowed

    verified = await verify_access_token(token, settings=settings, jwks=jwks, allow_anonymous=True)
    assert verified.is_anonymous is True
    assert verified.sub == uuid.UUID(claims_of(token)["sub"])


# --------------------------------------------------------------------------- the key set


async def test_a_cache_object_fetches_once_and_refuses_unknown_kids_without_refetching(
    settings: Settings, jwks: JwksCache, served: ServedJwks, token: str
) -> None:
    await verify_access_token(token, settings=settings, jwks=jwks)
    await verify_access_token(token, settings=settings, jwks=jwks)
    unknown = resign(token, headers={"kid": str(uuid.uuid4())})
    error = await refused(unknown, settings, jwks)
    assert type(error) is UnknownSigningKey
    assert "moments ago" in str(error)
    assert served.fetches == 1

    # Each cache object has its own key sets; clearing one forgets them.
    jwks.clear(settings)
    await verify_access_token(token, settings=settings, jwks=jwks)
    assert served.fetches == 2


async def test_a_key_set_without_keys_is_an_unavailable_service(
    settings: Settings, token: str
) -> None:
    error = await refused(token, settings, JwksCache(fetch=ServedJwks({"nope": []})))
    assert "did not answer a JWK set" in str(error)
    assert error.code == "auth_service_unavailable"


# --------------------------------------------------------------------------- settings, grants


def test_the_jwks_cache_time_is_capped_at_ten_minutes() -> None:
    with pytest.raises(SettingsError, match="AUTH_JWKS_CACHE_S"):
        settings_of(auth_jwks_cache_s=601)


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
