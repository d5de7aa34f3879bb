"""The stand-in's signing keys: a key store in the stack folder, and token signing.

Keys live in `<stack>/auth/keys.json` (0600): ES256 (P-256) or RS256 keys, each with a
`kid`, one of them current for minting. The server re-reads the file on every request, so
tests rotate keys with `add_signing_key()` / `remove_signing_key()` while it runs. Legacy
HS256 tokens are signed with the stack's JWT secret (`StackSecrets.jwt_secret`), which also
signs the anon and service-role API keys, as on a Supabase project with legacy keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tenantflow_dev.config import StackConfig
from tenantflow_dev.errors import StackError

__all__ = [
    "KeyAlgorithm",
    "SigningKey",
    "TokenAlgorithm",
    "add_signing_key",
    "ensure_signing_keys",
    "load_signing_keys",
    "remove_signing_key",
    "sign_token",
]

KeyAlgorithm = Literal["ES256", "RS256"]
TokenAlgorithm = Literal["ES256", "RS256", "HS256"]


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: KeyAlgorithm
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    def public_jwk(self) -> dict[str, Any]:
        """The public half, shaped like Supabase's JWKS entries."""
        public = self.private_key.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        return {
            **jwk,
            "kid": self.kid,
            "alg": self.algorithm,
            "use": "sig",
            "key_ops": ["verify"],
            "ext": True,
        }


def _keys_file(config: StackConfig) -> Path:
    return config.stack_dir / "auth" / "keys.json"


@contextlib.contextmanager
def _locked_keys(config: StackConfig) -> Iterator[dict[str, Any]]:
    """Read-modify-write of the keys file under an exclusive lock; written atomically."""
    path = _keys_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict[str, Any] = (
            json.loads(path.read_text()) if path.exists() else {"current": None, "keys": []}
        )
        yield data
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(temporary, path)


def _new_private_key(algorithm: KeyAlgorithm) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def add_signing_key(
    config: StackConfig, algorithm: KeyAlgorithm = "ES256", *, current: bool = False
) -> str:
    """Generate a key, publish it in the JWKS and return its `kid`.

    `current=True` also makes it the key that mints new tokens (a rotation); otherwise it is a
    published standby key, as Supabase publishes a key before it starts signing with it.
    """
    kid = str(uuid.uuid4())
    with _locked_keys(config) as data:
        data["keys"].append(
            {"kid": kid, "alg": algorithm, "private_pem": _pem(_new_private_key(algorithm))}
        )
        if current or not data.get("current"):
            data["current"] = kid
    return kid


def remove_signing_key(config: StackConfig, kid: str) -> None:
    """Unpublish a key (a revocation). The current key cannot be removed."""
    with _locked_keys(config) as data:
        if data.get("current") == kid:
            raise StackError(f"signing key {kid} is the current one; make another current first")
        data["keys"] = [entry for entry in data["keys"] if entry["kid"] != kid]


def ensure_signing_keys(config: StackConfig) -> None:
    """Create the stack's first ES256 key if it has none."""
    path = _keys_file(config)
    if path.exists() and json.loads(path.read_text()).get("current"):
        return
    with _locked_keys(config) as data:
        if not data.get("current"):
            kid = str(uuid.uuid4())
            data["keys"].append(
                {"kid": kid, "alg": "ES256", "private_pem": _pem(_new_private_key("ES256"))}
            )
            data["current"] = kid


def load_signing_keys(config: StackConfig) -> tuple[dict[str, SigningKey], str]:
    """All published keys by `kid`, and the current key's `kid`."""
    data = json.loads(_keys_file(config).read_text())
    keys: dict[str, SigningKey] = {}
    for entry in data["keys"]:
        private = serialization.load_pem_private_key(entry["private_pem"].encode(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise StackError(f"signing key {entry['kid']} has an unsupported type")
        keys[entry["kid"]] = SigningKey(entry["kid"], entry["alg"], private)
    return keys, data["current"]


def sign_token(
    config: StackConfig,
    claims: Mapping[str, Any],
    *,
    algorithm: TokenAlgorithm = "ES256",
    kid: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Sign `claims` as Supabase Auth would: with the current (or the named) asymmetric key and
    its `kid` in the header, or, for `HS256`, with the stack's legacy JWT secret."""
    if algorithm == "HS256":
        return jwt.encode(
            dict(claims), config.secrets.jwt_secret, algorithm="HS256", headers=dict(headers or {})
        )
    keys, current = load_signing_keys(config)
    key = keys[kid or current]
    return jwt.encode(
        dict(claims),
        key.private_key,
        algorithm=key.algorithm,
        headers={"kid": key.kid, "typ": "JWT", **(headers or {})},
    )


# --------------------------------------------------------------------------- users and tokens
