"""Sealed access tokens: a user's Supabase access token, encrypted to the workers.

Prefect stores flow-run parameters in clear and shows them to anyone with API access, so an
access token must never be a plain parameter. The caller (the SaaS backend, or
`tenantflow seal`) *seals* it to the workers' public key and passes the sealed value instead;
only a worker, which holds the private key, can open it.

Format: a JWE in compact serialization (five base64url segments)::

    protected header  {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "kid": KID,
                       "cty": "tenantflow-seal+json", "epk": {...}}
    payload (JSON)    {"v": 2, "tok": ACCESS_TOKEN, "flow": FLOW_NAME,
                       "clients": ["<uuid>", ...] | null, "params": SHA256_HEX,
                       "iat": INT, "exp": INT, "jti": RANDOM_128_BIT_ID}

- key agreement ECDH-ES on EC P-256 with an ephemeral sender key, the content key wrapped
  with AES-256 key wrap, the payload encrypted with AES-256-GCM (the protected header is the
  GCM additional data, so it cannot be altered either). No other algorithm is ever accepted;
- `kid` names the worker key the value was sealed to; the workers may hold several keys
  (`SEAL_PRIVATE_KEYS`, newest first) so keys can be rotated without breaking values in flight;
- the payload binds the token to one flow, to the client ids of the run (`null`: every
  active client, for service sweeps; more than `CLIENT_LIST_LIMIT` ids as
  `{"sha256": <hex of the sorted ids, one a line>, "count": n}`, so the value stays small)
  to every other parameter of the run (`params`: the SHA-256 of their canonical JSON,
  `parameters_digest()`; the run's period, day, revision...), and to a short lifetime
  (`iat`..`exp`);
- `jti` is returned as `OpenedSeal.seal_id`, so the caller can refuse a second use.

`open_sealed_token()` checks, in this order: size, shape, header, decryption, payload schema,
time, flow, clients, parameters. Every refusal is a `SealError` subclass whose message is safe
to show an operator: it never holds the token, a key or ciphertext, and it is raised without
its cause chain (a library error can carry bytes of the input).

Why tokens are sealed, and how keys rotate: docs/security.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar
from uuid import UUID

from joserfc import jwe
from joserfc.jwk import ECKey
from pydantic import SecretStr
from pydantic_core import PydanticSerializationError, to_jsonable_python

from tenantflow.errors import TenantflowError

__all__ = [
    "ALGORITHM",
    "CLIENT_LIST_LIMIT",
    "CONTENT_TYPE",
    "ENCRYPTION",
    "MAX_SEALED_BYTES",
    "MAX_TOKEN_BYTES",
    "UNBOUND_PARAMETERS",
    "NotSealed",
    "OpenedSeal",
    "SealError",
    "SealExpired",
    "SealKeyInvalid",
    "SealMalformed",
    "SealNotYetValid",
    "SealTooLongLived",
    "SealUndecryptable",
    "SealWrongClients",
    "SealWrongFlow",
    "SealWrongParameters",
    "canonical_parameters",
    "generate_private_key",
    "key_ids",
    "looks_like_plain_jwt",
    "looks_sealed",
    "open_sealed_token",
    "parameters_digest",
    "public_key",
    "seal_access_token",
]

ALGORITHM = "ECDH-ES+A256KW"
ENCRYPTION = "A256GCM"
CONTENT_TYPE = "tenantflow-seal+json"
CURVE = "P-256"
VERSION = 2
MAX_SEALED_BYTES = 16 * 1024
MAX_TOKEN_BYTES = 8 * 1024
MAX_TTL_S = 86_400
_MAX_KEYS_BYTES = 64 * 1024
_MAX_KEYS = 16
_MAX_FLOW_CHARS = 200
#: Up to this many client ids are sealed as a list; a longer list (a rerun of many failed
#: clients, say) is sealed as the SHA-256 of the sorted ids, so the value stays small.
CLIENT_LIST_LIMIT = 20

# NOTE: the registry is the allow-list joserfc enforces itself; the header check below refuses
# everything else first, so a second line of defence, not the only one.
_REGISTRY = jwe.JWERegistry(algorithms=[ALGORITHM, ENCRYPTION])
_HEADER_KEYS = frozenset({"alg", "enc", "kid", "cty", "epk"})
_PAYLOAD_KEYS = frozenset({"v", "tok", "flow", "clients", "params", "iat", "exp", "jti"})
#: Parameters a seal's `params` digest never covers: the seal itself, and the run's clients
#: (the flows' `client_id` / `client_ids`, which the seal's `clients` binds already).
UNBOUND_PARAMETERS = frozenset({"access_token", "client_id", "client_ids"})
_SEGMENT = r"[A-Za-z0-9_-]+"
# NOTE: both shapes start with "eyJ", base64url of '{"', the start of a JSON header.
_PLAIN_JWT = re.compile(rf"eyJ{_SEGMENT}\.{_SEGMENT}\.[A-Za-z0-9_-]*")
_SEALED = re.compile(rf"eyJ{_SEGMENT}(?:\.{_SEGMENT}){{4}}")
_PARTS = re.compile(rf"{_SEGMENT}(?:\.[A-Za-z0-9_-]*){{4}}")
# NOTE: key ids are echoed in messages and headers, so only plain, short ones are accepted.
_KID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class SealError(TenantflowError):
    """A sealed token was refused. The message is safe to show an operator."""

    code: ClassVar[str] = "seal_error"


class NotSealed(SealError):
    """The value is not a sealed token (perhaps a plain access token)."""

    code = "not_sealed"


class SealMalformed(SealError):
    """The value looks like a sealed token but its shape, header or payload is wrong."""

    code = "seal_malformed"


class SealUndecryptable(SealError):
    """Wrong key, unknown key id, or altered value: deliberately not told apart."""

    code = "seal_undecryptable"


class SealExpired(SealError):
    """The sealed token's `exp` has passed."""

    code = "seal_expired"


class SealNotYetValid(SealError):
    """The sealed token's `iat` is in the future, beyond the leeway."""

    code = "seal_not_yet_valid"


class SealTooLongLived(SealError):
    """The sealed token's lifetime (`exp - iat`) is longer than the opener allows."""

    code = "seal_too_long_lived"


class SealWrongFlow(SealError):
    """The token was sealed for another flow."""

    code = "seal_wrong_flow"


class SealWrongClients(SealError):
    """The token was sealed for other clients than this run's."""

    code = "seal_wrong_clients"


class SealWrongParameters(SealError):
    """The token was sealed for a run with other parameters (period, day, revision...)."""

    code = "seal_wrong_parameters"


class SealKeyInvalid(SealError, ValueError):
    """A key or key set is unusable. The message never holds key material.

    NOTE: also a `ValueError`, so a pydantic validator turns it into a validation error.
    """

    code = "seal_key_invalid"


@dataclass(frozen=True)
class OpenedSeal:
    """What an opened seal holds; `repr` shows `token` only as `SecretStr('**********')`.

    Attributes:
        token: The plain access token, still to be verified as a JWT.
        seal_id: The payload's `jti`, unique per seal: the caller's key against replays.
        flow: The flow the token was sealed for.
        client_ids: The clients it was sealed for; None means every active client.
        issued_at: `iat`, UTC.
        expires_at: `exp`, UTC.
    """

    token: SecretStr
    seal_id: str
    flow: str
    client_ids: tuple[UUID, ...] | None
    issued_at: datetime
    expires_at: datetime


def looks_like_plain_jwt(value: str) -> bool:
    """Whether `value` has the shape of a JWS compact JWT: three base64url segments."""
    return bool(_PLAIN_JWT.fullmatch(value.strip()))


def looks_sealed(value: str) -> bool:
    """Whether `value` has the shape of a JWE compact serialization: five base64url segments."""
    return bool(_SEALED.fullmatch(value.strip()))


# --- keys -------------------------------------------------------------------------------------


def _short(value: object, limit: int = 40) -> str:
    """A harmless rendering of a value read from untrusted input, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_kid(kid: object, where: str) -> str:
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise SealKeyInvalid(
            f"{where}: `kid` must be 1-64 characters of letters, digits and . _ : - "
            "(starting with a letter or digit)"
        )
    return kid


def _check_ec_jwk(jwk: Mapping[str, Any], where: str, *, private: bool) -> str:
    """Check a JWK's declared parameters; return its kid. Never renders key material."""
    if jwk.get("kty") != "EC" or jwk.get("crv") != CURVE:
        raise SealKeyInvalid(f"{where} is not an EC {CURVE} key (kty EC, crv {CURVE})")
    if private and "d" not in jwk:
        raise SealKeyInvalid(f"{where} is a public key; the workers need the private JWK")
    if jwk.get("use", "enc") != "enc":
        raise SealKeyInvalid(f"{where} has `use` {_short(jwk.get('use'))}, not enc")
    if jwk.get("alg", ALGORITHM) != ALGORITHM:
        raise SealKeyInvalid(f"{where} has `alg` {_short(jwk.get('alg'))}, not {ALGORITHM}")
    if "kid" not in jwk:
        raise SealKeyInvalid(f"{where} has no `kid`; seals name the key they were made for")
    return _check_kid(jwk["kid"], where)


def _import_ec(jwk: Mapping[str, Any], where: str, *, private: bool) -> ECKey:
    kid = _check_ec_jwk(jwk, where, private=private)
    names = ("kty", "crv", "x", "y", "d") if private else ("kty", "crv", "x", "y")
    try:
        # NOTE: cryptography checks the point is on the curve and matches `d`.
        key = ECKey.import_key({name: jwk[name] for name in names if name in jwk})
    except Exception:
        # NOTE: a broad catch on purpose: library messages may quote the key's numbers.
        raise SealKeyInvalid(f"{where} (kid {kid}) is not a valid EC {CURVE} JWK") from None
    if key.is_private != private:
        raise SealKeyInvalid(f"{where} (kid {kid}) is not a valid EC {CURVE} JWK")
    return key


def _load_private_keys(private_keys: str) -> dict[str, ECKey]:
    """Parse a private JWK or JWK Set (JSON text) into {kid: key}, in the set's order."""
    if not isinstance(private_keys, str) or not private_keys.strip():
        raise SealKeyInvalid("the private key set is empty; expected a JWK or a JWK Set (JSON)")
    if len(private_keys.encode()) > _MAX_KEYS_BYTES:
        raise SealKeyInvalid(f"the private key set is larger than {_MAX_KEYS_BYTES} bytes")
    try:
        document = json.loads(private_keys)
    except (ValueError, RecursionError):
        raise SealKeyInvalid(
            'the private key set is not JSON; expected a JWK or a JWK Set {"keys": [...]}'
        ) from None
    if not isinstance(document, dict):
        raise SealKeyInvalid("the private key set must be a JSON object (a JWK or a JWK Set)")
    entries = document.get("keys") if "keys" in document else [document]
    if not isinstance(entries, list) or not entries:
        raise SealKeyInvalid("the JWK Set's `keys` must be a non-empty list")
    if len(entries) > _MAX_KEYS:
        raise SealKeyInvalid(f"the JWK Set holds more than {_MAX_KEYS} keys")
    keys: dict[str, ECKey] = {}
    for index, entry in enumerate(entries, start=1):
        where = f"key #{index}"
        if not isinstance(entry, dict):
            raise SealKeyInvalid(f"{where} is not a JSON object")
        key = _import_ec(entry, where, private=True)
        kid = entry["kid"]
        if kid in keys:
            raise SealKeyInvalid(f"{where}: kid {kid} appears twice in the set")
        keys[kid] = key
    return keys


def _public_jwk(key: ECKey, kid: str) -> dict[str, Any]:
    public = key.as_dict(private=False)
    return {
        "kty": "EC",
        "crv": CURVE,
        "x": public["x"],
        "y": public["y"],
        "kid": kid,
        "use": "enc",
        "alg": ALGORITHM,
    }


def _dumps(document: Mapping[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"))


def generate_private_key(kid: str | None = None) -> str:
    """Generate a worker key: a private EC P-256 JWK, as one line of JSON.

    Args:
        kid: The key id; by default `seal-<UTC date>-<8 hex digits>`.

    Returns:
        The private JWK (with `kid`, `use="enc"`, `alg="ECDH-ES+A256KW"`).

    Raises:
        SealKeyInvalid: `kid` is not a plain, short key id.
    """
    if kid is None:
        kid = f"seal-{datetime.now(UTC):%Y-%m-%d}-{secrets.token_hex(4)}"
    _check_kid(kid, "the key id")
    key = ECKey.generate_key(CURVE)
    private = key.as_dict(private=True)
    return _dumps({**_public_jwk(key, kid), "d": private["d"]})


def public_key(private_keys: str, kid: str | None = None) -> str:
    """The public JWK (one line of JSON) of a worker key, to hand to whoever seals.

    Args:
        private_keys: A private JWK or a JWK Set, as JSON text.
        kid: Which key; by default the first of the set, the current one (new keys are put
            first when rotating).

    Raises:
        SealKeyInvalid: The key set is unusable, or holds no key `kid`.
    """
    keys = _load_private_keys(private_keys)
    if kid is None:
        kid = next(iter(keys))
    elif kid not in keys:
        known = ", ".join(keys)
        raise SealKeyInvalid(f"no key with kid {_short(kid)} in the key set (it has: {known})")
    return _dumps(_public_jwk(keys[kid], kid))


def key_ids(private_keys: str) -> list[str]:
    """The key ids of a private JWK or JWK Set, in order; also validates every key.

    Raises:
        SealKeyInvalid: The key set is unusable; the message names the key, never its numbers.
    """
    return list(_load_private_keys(private_keys))


# --- sealing ----------------------------------------------------------------------------------


def _parse_public_key(public_key: str | Mapping[str, Any]) -> tuple[ECKey, str]:
    if isinstance(public_key, str):
        try:
            document = json.loads(public_key)
        except (ValueError, RecursionError):
            raise ValueError("the public key is not JSON; expected a public JWK") from None
    else:
        document = public_key
    if not isinstance(document, Mapping):
        raise ValueError("the public key must be a JWK (a JSON object)")
    if "keys" in document:
        raise ValueError("expected one public JWK, not a JWK Set")
    if "d" in document:
        raise ValueError(
            "this JWK holds a private key (`d`); seal with the PUBLIC key "
            "(`tenantflow seal-key public`): the private key must stay on the workers"
        )
    try:
        key = _import_ec(document, "the public key", private=False)
    except SealKeyInvalid as error:
        raise ValueError(str(error)) from None
    return key, document["kid"]


def _client_strings(client_ids: Sequence[UUID | str] | None) -> list[str] | None:
    if client_ids is None:
        return None
    if isinstance(client_ids, str | bytes):
        raise ValueError("client_ids must be a list of client ids, not a single string")
    if not client_ids:
        raise ValueError("client_ids is empty: give at least one client id, or None for all")
    parsed: set[str] = set()
    for index, client in enumerate(client_ids, start=1):
        try:
            parsed.add(str(client if isinstance(client, UUID) else UUID(str(client))))
        except ValueError:
            raise ValueError(f"client id #{index} is not a UUID: {_short(client)}") from None
    return sorted(parsed)


def _clients_digest(clients: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(clients)).encode()).hexdigest()


def _sealed_clients(clients: list[str] | None) -> list[str] | dict[str, Any] | None:
    if clients is None or len(clients) <= CLIENT_LIST_LIMIT:
        return clients
    return {"sha256": _clients_digest(clients), "count": len(clients)}


def _canonical_value(value: Any) -> Any:
    """One parameter value in the JSON form both sides of a seal agree on."""
    plain = to_jsonable_python(value)
    if isinstance(plain, str):
        try:
            return str(UUID(plain)) if len(plain) == 36 else plain
        except ValueError:
            return plain
    if isinstance(plain, list):
        items = [_canonical_value(item) for item in plain]
        # NOTE: a list of ids (client_ids) is a set to the flows: its order is not bound.
        if items and all(isinstance(item, str) and _is_uuid(item) for item in items):
            return sorted(items)
        return items
    if isinstance(plain, dict):
        return {str(key): _canonical_value(item) for key, item in plain.items()}
    return plain


def _is_uuid(value: str) -> bool:
    try:
        UUID(value)
    except ValueError:
        return False
    return len(value) == 36


def canonical_parameters(
    parameters: Mapping[str, Any], *, leave_out: frozenset[str] = UNBOUND_PARAMETERS
) -> dict[str, Any]:
    """A run's parameters as a seal binds them: all but `leave_out`, in JSON form.

    Unset (`None`) values are left out, dates are ISO strings, ids lowercase, a list of ids
    sorted: the same run described by a caller (strings) and by the flow (typed values)
    gives the same form.
    """
    if not isinstance(parameters, Mapping):
        raise ValueError("parameters must be a mapping of parameter names to values")
    try:
        return {
            str(name): _canonical_value(value)
            for name, value in sorted(parameters.items())
            if name not in leave_out and value is not None
        }
    except PydanticSerializationError:
        raise ValueError("a parameter value cannot be expressed in JSON") from None


def parameters_digest(parameters: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of a run's canonical parameters (`canonical_parameters`): what a
    seal's `params` holds."""
    document = json.dumps(
        canonical_parameters(parameters), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(document.encode()).hexdigest()


def seal_access_token(
    token: str,
    public_key: str | Mapping[str, Any],
    *,
    flow: str,
    client_ids: Sequence[UUID | str] | None,
    parameters: Mapping[str, Any] | None = None,
    ttl_s: int = 900,
    now: float | None = None,
) -> str:
    """Seal an access token to the workers' public key, for one run: its flow, its clients
    and every other parameter it will be started with.

    Args:
        token: The plain access token (a JWT).
        public_key: The workers' public JWK, as JSON text or a mapping; it must have a `kid`.
        flow: The name of the flow that may open it.
        client_ids: The run's client ids; None for every active client (service sweeps).
        parameters: The run's other parameters exactly as it will be started with them
            (the token and the clients aside, `UNBOUND_PARAMETERS`; unset ones and those left
            to their defaults may be left out). A worker refuses the seal in a run whose
            parameters differ.
        ttl_s: Lifetime in seconds, 1 to 86400.
        now: The current Unix time (tests); by default the clock.

    Returns:
        The JWE compact serialization, to pass as the flow-run parameter.

    Raises:
        ValueError: An input is invalid (the message never holds the token or a key).
    """
    if not isinstance(token, str) or not token.strip():
        raise ValueError("the access token is empty")
    token = token.strip()
    if looks_sealed(token):
        raise ValueError("the access token is already sealed")
    if len(token.encode()) > MAX_TOKEN_BYTES:
        raise ValueError(f"the access token is longer than {MAX_TOKEN_BYTES} bytes")
    if not isinstance(flow, str) or not flow.strip() or flow != flow.strip():
        raise ValueError("flow must be a flow name (non-empty, no surrounding spaces)")
    if len(flow) > _MAX_FLOW_CHARS:
        raise ValueError(f"flow must be at most {_MAX_FLOW_CHARS} characters")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be a whole number of seconds from 1 to {MAX_TTL_S}")
    clients = _sealed_clients(_client_strings(client_ids))
    params = parameters_digest(parameters or {})
    key, kid = _parse_public_key(public_key)
    issued = int(time.time() if now is None else now)
    payload = {
        "v": VERSION,
        "tok": token,
        "flow": flow,
        "clients": clients,
        "params": params,
        "iat": issued,
        "exp": issued + ttl_s,
        "jti": secrets.token_urlsafe(16),
    }
    header = {"alg": ALGORITHM, "enc": ENCRYPTION, "kid": kid, "cty": CONTENT_TYPE}
    return jwe.encrypt_compact(header, _dumps(payload).encode(), key, registry=_REGISTRY)


# --- opening ----------------------------------------------------------------------------------

_NOT_SEALED_HINT = (
    "seal it with `tenantflow seal --flow FLOW --client CLIENT_ID` "
    "or `tenantflow.sealing.seal_access_token()` and paste the sealed value"
)


def _check_shape(sealed: object) -> str:
    if not isinstance(sealed, str):
        raise NotSealed(f"expected a sealed token (a string), not {type(sealed).__name__}")
    value = sealed.strip()
    if not value:
        raise NotSealed(f"no sealed token was given (empty value); {_NOT_SEALED_HINT}")
    if len(value.encode()) > MAX_SEALED_BYTES:
        raise SealMalformed(f"the sealed token is longer than {MAX_SEALED_BYTES} bytes")
    if looks_like_plain_jwt(value):
        raise NotSealed(
            "this is a plain access token, which Prefect would store in clear; " + _NOT_SEALED_HINT
        )
    if value.count(".") != 4:
        raise NotSealed(
            f"this is not a sealed token (a JWE of five dot-separated parts); {_NOT_SEALED_HINT}"
        )
    # NOTE: empty parts are left to the header check, so a JWE of another algorithm (`dir`
    # and `ECDH-ES` have no encrypted key) is refused for its algorithm, which says more.
    if not _PARTS.fullmatch(value):
        raise SealMalformed("the sealed token has five parts but they are not all base64url")
    return value


def _b64json(segment: str) -> object:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def _check_header(value: str) -> str:
    """Check the protected header; return its kid."""
    try:
        header = _b64json(value.split(".", 1)[0])
    except (binascii.Error, ValueError, RecursionError):
        # NOTE: RecursionError: deeply nested JSON ("[[[[...") fits in the size limit.
        raise SealMalformed("the sealed token's header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise SealMalformed("the sealed token's header is not a JSON object")
    if header.get("alg") != ALGORITHM or header.get("enc") != ENCRYPTION:
        raise SealMalformed(
            f"the sealed token uses alg {_short(header.get('alg'))} / enc "
            f"{_short(header.get('enc'))}; only {ALGORITHM} with {ENCRYPTION} is accepted"
        )
    if header.get("cty") != CONTENT_TYPE:
        raise SealMalformed(f"the sealed token's content type is not {CONTENT_TYPE}")
    extra = sorted(str(name) for name in set(header) - _HEADER_KEYS)
    if extra or not isinstance(header.get("epk"), dict):
        raise SealMalformed(
            "the sealed token's header must hold exactly alg, enc, kid, cty and epk"
            + (f" (unexpected: {_short(', '.join(extra))})" if extra else "")
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise SealMalformed("the sealed token's header has no usable `kid`")
    if not looks_sealed(value):
        raise SealMalformed("the sealed token has an empty part")
    return kid


def _undecryptable() -> SealUndecryptable:
    return SealUndecryptable(
        "the sealed token cannot be opened with this worker's keys (sealed to another key, "
        "or altered); seal it again with the workers' current public key"
    )


def _decrypt(value: str, kid: str, private_keys: str) -> bytes:
    keys = _load_private_keys(private_keys)
    key = keys.get(kid)
    if key is None:
        raise _undecryptable()
    try:
        opened = jwe.decrypt_compact(value, key, registry=_REGISTRY)
    except Exception:
        # NOTE: a broad catch on purpose: wrong key, bad tag, bad epk and malformed segments
        # all end here, and library messages must not reach the operator.
        raise _undecryptable() from None
    if opened.plaintext is None:
        raise _undecryptable()
    return opened.plaintext


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_payload(plaintext: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(plaintext)
    except (ValueError, RecursionError):
        raise SealMalformed("the sealed payload is not JSON") from None
    if not isinstance(payload, dict) or set(payload) != _PAYLOAD_KEYS:
        raise SealMalformed(
            "the sealed payload must hold exactly v, tok, flow, clients, params, iat, exp "
            "and jti (a seal of an older tenantflow: seal it again)"
        )
    if not _is_int(payload["v"]) or payload["v"] != VERSION:
        raise SealMalformed(f"the sealed payload's version is not {VERSION}")
    if not isinstance(payload["params"], str) or not re.fullmatch(
        r"[0-9a-f]{64}", payload["params"]
    ):
        raise SealMalformed("the sealed payload's `params` digest is malformed")
    for name in ("tok", "flow", "jti"):
        if not isinstance(payload[name], str) or not payload[name]:
            raise SealMalformed(f"the sealed payload's `{name}` must be a non-empty string")
    if not _is_int(payload["iat"]) or not _is_int(payload["exp"]):
        raise SealMalformed("the sealed payload's `iat` and `exp` must be whole seconds")
    if payload["exp"] <= payload["iat"]:
        raise SealMalformed("the sealed payload's `exp` is not after its `iat`")
    clients = payload["clients"]
    if isinstance(clients, dict):
        digest, count = clients.get("sha256"), clients.get("count")
        if (
            set(clients) != {"sha256", "count"}
            or not isinstance(digest, str)
            or not re.fullmatch(r"[0-9a-f]{64}", digest)
            or not isinstance(count, int)
            or isinstance(count, bool)
            or count <= CLIENT_LIST_LIMIT
        ):
            raise SealMalformed("the sealed payload's `clients` digest is malformed")
    elif clients is not None:
        if not isinstance(clients, list) or not clients:
            raise SealMalformed("the sealed payload's `clients` must be null or a non-empty list")
        try:
            payload["clients"] = tuple(UUID(client) for client in clients)
        except (TypeError, ValueError, AttributeError):
            raise SealMalformed("the sealed payload's `clients` are not all UUIDs") from None
    return payload


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _check_time(payload: Mapping[str, Any], now: float, leeway_s: float, max_ttl_s: int) -> None:
    issued, expires = payload["iat"], payload["exp"]
    if now > expires + leeway_s:
        raise SealExpired(
            f"the sealed token expired at {_utc(expires):%Y-%m-%d %H:%M:%S} UTC "
            f"({int(now - expires)} s ago); seal a fresh one"
        )
    if issued > now + leeway_s:
        raise SealNotYetValid(
            f"the sealed token is issued {int(issued - now)} s in the future "
            f"({_utc(issued):%Y-%m-%d %H:%M:%S} UTC); check the sealing machine's clock"
        )
    if expires - issued > max_ttl_s:
        raise SealTooLongLived(
            f"the sealed token lives {expires - issued} s, longer than the {max_ttl_s} s "
            "this worker accepts; seal one with a shorter lifetime"
        )


def _render_clients(clients: Sequence[UUID] | Mapping[str, Any] | None) -> str:
    if clients is None:
        return "every active client"
    if isinstance(clients, Mapping):
        return f"{clients['count']} clients (sealed by their digest)"
    shown = ", ".join(str(client) for client in sorted(clients, key=str)[:5])
    return f"{shown}, ... ({len(clients)} clients)" if len(clients) > 5 else shown


def _run_clients(client_ids: Sequence[UUID]) -> set[UUID]:
    if isinstance(client_ids, str | bytes):
        raise ValueError("client_ids must be a list of client ids, not a single string")
    try:
        return {UUID(str(client)) for client in client_ids}
    except ValueError:
        raise ValueError("this run's client_ids are not all UUIDs") from None


def _check_binding(
    payload: Mapping[str, Any], flow: str, client_ids: Sequence[UUID] | None
) -> tuple[UUID, ...] | None:
    """Check flow and clients; return the clients the seal was verified for."""
    if payload["flow"] != flow:
        raise SealWrongFlow(
            f"the token was sealed for flow {_short(payload['flow'], 80)}, "
            f"but this run is flow {_short(flow, 80)}; seal it for this flow"
        )
    sealed: tuple[UUID, ...] | dict[str, Any] | None = payload["clients"]
    wanted = None if client_ids is None else _run_clients(client_ids)
    if isinstance(sealed, dict):
        matches = wanted is not None and (
            len(wanted) == sealed["count"]
            and hmac.compare_digest(_clients_digest([str(c) for c in wanted]), sealed["sha256"])
        )
    else:
        matches = (sealed is None and wanted is None) or (
            sealed is not None and wanted is not None and set(sealed) == wanted
        )
    if not matches:
        raise SealWrongClients(
            f"the token was sealed for {_render_clients(sealed)}, but this run is for "
            f"{_render_clients(None if wanted is None else tuple(wanted))}; "
            "seal it for this run's clients"
        )
    return None if wanted is None else tuple(sorted(wanted, key=str))


def _check_parameters(
    payload: Mapping[str, Any], parameters: Mapping[str, Any], defaults: Mapping[str, Any]
) -> None:
    """The run's parameters must be those sealed: all of them, or all but those left to
    their defaults (a sealer need not know a flow's defaults)."""
    given = canonical_parameters(parameters)
    plain = canonical_parameters(defaults)
    without_defaults = {name: value for name, value in given.items() if plain.get(name) != value}
    candidates = {parameters_digest(given), parameters_digest(without_defaults)}
    if not any(hmac.compare_digest(digest, payload["params"]) for digest in candidates):
        raise SealWrongParameters(
            "the token was sealed for a run with other parameters than this one's (a seal "
            f"binds every parameter of its run; this run has {_render_names(given)}); "
            "seal a fresh one with exactly this run's parameters"
        )


def _render_names(parameters: Mapping[str, Any]) -> str:
    return ", ".join(sorted(parameters)) if parameters else "no other parameters"


def open_sealed_token(
    sealed: str,
    private_keys: str,
    *,
    flow: str,
    client_ids: Sequence[UUID] | None,
    parameters: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    max_ttl_s: int = 3600,
    leeway_s: float = 10,
    now: float | None = None,
) -> OpenedSeal:
    """Open a sealed access token on a worker and check what it is bound to.

    The returned token is not yet verified as a JWT: the caller verifies it as before, and
    records `seal_id` to refuse a second use.

    Args:
        sealed: The sealed value (JWE compact serialization).
        private_keys: The workers' private JWK or JWK Set (JSON text); `kid` picks the key.
        flow: The name of the flow being run.
        client_ids: This run's client ids; None for every active client. Compared as sets:
            None only matches a token sealed for None.
        parameters: Every parameter this run was started with, as the flow received them
            (`access_token` is ignored); their digest must be the sealed one.
        defaults: The flow's parameter defaults: a seal that left out parameters at their
            defaults matches too.
        max_ttl_s: Longest lifetime (`exp - iat`) accepted.
        leeway_s: Clock skew tolerated on `exp` and `iat`, in seconds.
        now: The current Unix time (tests); by default the clock.

    Raises:
        SealError: A subclass naming the refusal; its message never holds the token or a key.
    """
    value = _check_shape(sealed)
    kid = _check_header(value)
    payload = _check_payload(_decrypt(value, kid, private_keys))
    _check_time(payload, time.time() if now is None else now, leeway_s, max_ttl_s)
    clients = _check_binding(payload, flow, client_ids)
    _check_parameters(payload, parameters, defaults or {})
    return OpenedSeal(
        token=SecretStr(payload["tok"]),
        seal_id=payload["jti"],
        flow=payload["flow"],
        client_ids=clients,
        issued_at=_utc(payload["iat"]),
        expires_at=_utc(payload["exp"]),
    )
