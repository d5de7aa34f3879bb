"""Sealed access tokens: a round trip, every hostile value refused, no secret in any message.

Pure tests: no database, no Prefect server, no `stack` fixture.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from joserfc import jwe
from joserfc.errors import UnsupportedAlgorithmError
from joserfc.jwk import ECKey

from tenantflow import sealing
from tenantflow.sealing import (
    CLIENT_LIST_LIMIT,
    NotSealed,
    OpenedSeal,
    SealError,
    SealExpired,
    SealKeyInvalid,
    SealMalformed,
    SealNotYetValid,
    SealTooLongLived,
    SealUndecryptable,
    SealWrongClients,
    SealWrongFlow,
    SealWrongParameters,
    canonical_parameters,
    generate_private_key,
    key_ids,
    looks_like_plain_jwt,
    looks_sealed,
    open_sealed_token,
    parameters_digest,
    public_key,
    seal_access_token,
)
from tenantflow.settings import SettingsError, load_seal_settings, load_settings
from tests.unit.test_settings import VALID as VALID_SETTINGS

# A plain access token's shape, with a marker no message may ever contain.
TOKEN = (
    "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiJ0b2tlbi1tYXJrZXItN2YzYSJ9."
    "c2lnbmF0dXJlLW1hcmtlci1xdWl4b3Rl"
)
FLOW = "client-report"
CLIENT = UUID("0b5b0c5e-1111-4222-8333-944445555666")
OTHER = UUID("1c6c1d6f-2222-4333-9444-a55556666777")
NOW = 1_800_000_000.0
KEY = generate_private_key("k1")
D = json.loads(KEY)["d"]
# Another key pair under the same kid: a value sealed to it must not open.
IMPOSTOR = generate_private_key("k1")
STRANGER = generate_private_key("k9")


def seal(
    *,
    key: str = KEY,
    flow: str = FLOW,
    clients: list[Any] | None = None,
    ttl_s: int = 900,
    now: float = NOW,
    token: str = TOKEN,
) -> str:
    return seal_access_token(
        token,
        public_key(key),
        flow=flow,
        client_ids=[CLIENT] if clients is None else clients,
        ttl_s=ttl_s,
        now=now,
    )


def open_(sealed: str, **changes: Any) -> OpenedSeal:
    options: dict[str, Any] = {
        "flow": FLOW,
        "client_ids": [CLIENT],
        "parameters": {},
        "now": NOW + 1,
    }
    return open_sealed_token(sealed, changes.pop("keys", KEY), **{**options, **changes})


def assert_safe(error: BaseException, *secrets: str) -> None:
    """Neither the message nor the repr holds a secret, and nothing is chained."""
    for secret in (TOKEN, D, *secrets):
        for rendered in (str(error), repr(error)):
            assert secret not in rendered
    for part in TOKEN.split("."):
        assert part not in str(error)
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None


def refused(kind: type[SealError], sealed: str, **changes: Any) -> str:
    with pytest.raises(SealError) as caught:
        open_(sealed, **changes)
    assert type(caught.value) is kind, f"{type(caught.value).__name__}: {caught.value}"
    # NOTE: ciphertext segments of the value must not be echoed either.
    segments = [part for part in sealed.split(".")[1:] if len(part) > 12]
    assert_safe(caught.value, *segments)
    assert caught.value.code == kind.code
    return str(caught.value)


def b64(document: Any) -> str:
    raw = document if isinstance(document, bytes) else json.dumps(document).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def header_of(sealed: str) -> dict[str, Any]:
    segment = sealed.split(".")[0]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * 4))
    return decoded


def flip(segment: str) -> str:
    middle = len(segment) // 2
    return segment[:middle] + ("B" if segment[middle] != "B" else "C") + segment[middle + 1 :]


# --- round trip --------------------------------------------------------------------------------


def test_round_trip_returns_the_token_and_what_it_is_bound_to() -> None:
    sealed = seal(clients=[OTHER, str(CLIENT).upper(), CLIENT])
    assert looks_sealed(sealed) and not looks_like_plain_jwt(sealed)
    assert TOKEN not in sealed
    opened = open_(sealed, client_ids=[CLIENT, OTHER])
    assert opened.token.get_secret_value() == TOKEN
    assert opened.flow == FLOW
    assert opened.client_ids == tuple(sorted([CLIENT, OTHER], key=str))
    assert opened.issued_at.timestamp() == NOW
    assert opened.expires_at.timestamp() == NOW + 900
    assert opened.issued_at.utcoffset().total_seconds() == 0
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", opened.seal_id)  # 128 random bits
    for rendered in (repr(opened), str(opened)):
        assert TOKEN not in rendered


def test_header_is_exactly_the_allowed_one() -> None:
    header = header_of(seal())
    assert set(header) == {"alg", "enc", "kid", "cty", "epk"}
    assert (header["alg"], header["enc"], header["kid"], header["cty"]) == (
        "ECDH-ES+A256KW",
        "A256GCM",
        "k1",
        "tenantflow-seal+json",
    )
    assert header["epk"]["crv"] == "P-256"


def test_every_seal_is_unique() -> None:
    first, second = seal(), seal()
    assert first != second
    assert header_of(first)["epk"] != header_of(second)["epk"]
    assert open_(first).seal_id != open_(second).seal_id


def test_sealed_for_every_client_opens_only_for_every_client() -> None:
    sealed = seal_access_token(TOKEN, public_key(KEY), flow="nightly-rollup", client_ids=None)
    opened = open_sealed_token(sealed, KEY, flow="nightly-rollup", client_ids=None, parameters={})
    assert opened.client_ids is None
    assert opened.token.get_secret_value() == TOKEN


def test_public_key_may_be_a_mapping() -> None:
    sealed = seal_access_token(
        TOKEN, json.loads(public_key(KEY)), flow=FLOW, client_ids=[CLIENT], now=NOW
    )
    assert open_(sealed).token.get_secret_value() == TOKEN


# --- keys and rotation -------------------------------------------------------------------------


def test_rotation_both_keys_open_and_the_first_is_current() -> None:
    new, old = generate_private_key("k-new"), generate_private_key("k-old")
    keys = json.dumps({"keys": [json.loads(new), json.loads(old)]})
    assert key_ids(keys) == ["k-new", "k-old"]
    assert json.loads(public_key(keys))["kid"] == "k-new"
    assert public_key(keys, "k-old") == public_key(old)
    for sealer in (new, old):
        opened = open_(seal(key=sealer), keys=keys)
        assert opened.token.get_secret_value() == TOKEN
    # A worker that lost the new key cannot open values sealed to it.
    refused(SealUndecryptable, seal(key=new), keys=old)


def test_generated_key_is_private_p256_for_encryption() -> None:
    jwk = json.loads(generate_private_key())
    assert re.fullmatch(r"seal-\d{4}-\d{2}-\d{2}-[0-9a-f]{8}", jwk["kid"])
    assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == (
        "EC",
        "P-256",
        "enc",
        "ECDH-ES+A256KW",
    )
    assert "d" in jwk
    assert "\n" not in generate_private_key()
    public = json.loads(public_key(json.dumps(jwk)))
    assert "d" not in public and public["x"] == jwk["x"]


def test_public_key_of_an_unknown_kid_is_refused() -> None:
    with pytest.raises(SealKeyInvalid, match="no key with kid") as caught:
        public_key(KEY, "k2")
    assert_safe(caught.value)


def _key_with(**changes: Any) -> str:
    jwk = {**json.loads(KEY), **changes}
    return json.dumps({name: value for name, value in jwk.items() if value is not None})


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("", "empty"),
        ("not json " + D, "not JSON"),
        ("[1, 2]", "JSON object"),
        ("[" * 50_000, "not JSON"),
        ('{"keys": []}', "non-empty list"),
        (_key_with(d=None), "public key"),
        (_key_with(crv="P-384"), "EC P-256"),
        (_key_with(kty="RSA"), "EC P-256"),
        (_key_with(use="sig"), "not enc"),
        (_key_with(alg="RSA1_5"), "not ECDH-ES+A256KW"),
        (_key_with(kid=None), "no `kid`"),
        (_key_with(kid="has space"), "`kid` must be"),
        (_key_with(x=json.loads(IMPOSTOR)["x"]), "not a valid EC P-256 JWK"),
        (json.dumps({"keys": [json.loads(KEY), json.loads(KEY)]}), "appears twice"),
    ],
)
def test_bad_key_sets_are_refused_without_echoing_them(keys: str, expected: str) -> None:
    with pytest.raises(SealKeyInvalid) as caught:
        key_ids(keys)
    assert expected in str(caught.value)
    assert_safe(caught.value, json.loads(KEY)["x"], json.loads(IMPOSTOR)["x"])
    assert isinstance(caught.value, ValueError)


def test_generate_refuses_a_bad_kid() -> None:
    with pytest.raises(SealKeyInvalid):
        generate_private_key("no/slashes here")


# --- sealing inputs ----------------------------------------------------------------------------


def test_seal_refuses_a_private_jwk() -> None:
    with pytest.raises(ValueError, match="private key") as caught:
        seal_access_token(TOKEN, KEY, flow=FLOW, client_ids=[CLIENT])
    assert_safe(caught.value)


@pytest.mark.parametrize(
    ("jwk", "expected"),
    [
        ("{nope", "not JSON"),
        ('"a string"', "JSON object"),
        (json.dumps({"keys": [json.loads(public_key(KEY))]}), "not a JWK Set"),
        (
            json.dumps(ECKey.generate_key("P-384").as_dict(private=False, kid="p384")),
            "EC P-256",
        ),
        (json.dumps(ECKey.generate_key("P-256").as_dict(private=False)), "no `kid`"),
    ],
)
def test_seal_refuses_keys_that_are_not_a_public_p256_jwk(jwk: str, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)) as caught:
        seal_access_token(TOKEN, jwk, flow=FLOW, client_ids=[CLIENT])
    assert_safe(caught.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"token": ""}, "empty"),
        ({"token": "  \n"}, "empty"),
        ({"token": "x" * 9000}, "longer than"),
        ({"flow": ""}, "flow"),
        ({"flow": " client-report"}, "flow"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"ttl_s": 86_401}, "ttl_s"),
        ({"ttl_s": True}, "ttl_s"),
        ({"client_ids": str(CLIENT)}, "not a single string"),
        ({"client_ids": []}, "empty"),
        ({"client_ids": [CLIENT, "not-a-uuid"]}, "client id #2"),
    ],
)
def test_seal_validates_its_inputs(changes: dict[str, Any], expected: str) -> None:
    arguments: dict[str, Any] = {"token": TOKEN, "flow": FLOW, "client_ids": [CLIENT]}
    arguments.update(changes)
    token = arguments.pop("token")
    with pytest.raises(ValueError, match=re.escape(expected)) as caught:
        seal_access_token(token, public_key(KEY), **arguments)
    assert_safe(caught.value)


def test_seal_refuses_an_already_sealed_token() -> None:
    with pytest.raises(ValueError, match="already sealed"):
        seal_access_token(seal(), public_key(KEY), flow=FLOW, client_ids=[CLIENT])


# --- refusals: keys and tampering --------------------------------------------------------------


def test_sealed_to_another_key_pair_is_undecryptable() -> None:
    refused(SealUndecryptable, seal(key=IMPOSTOR))


def test_unknown_kid_is_undecryptable_with_the_same_message() -> None:
    unknown = refused(SealUndecryptable, seal(key=STRANGER))
    wrong_key = refused(SealUndecryptable, seal(key=IMPOSTOR))
    assert unknown == wrong_key
    assert "cannot be opened with this worker's keys" in unknown
    assert "k9" not in unknown


@pytest.mark.parametrize("index", [1, 2, 3, 4], ids=["encrypted-key", "iv", "ciphertext", "tag"])
def test_tampered_segments_are_undecryptable(index: int) -> None:
    parts = seal().split(".")
    parts[index] = flip(parts[index])
    refused(SealUndecryptable, ".".join(parts))


def test_tampered_protected_header_is_refused() -> None:
    parts = seal().split(".")
    parts[0] = flip(parts[0])
    with pytest.raises((SealUndecryptable, SealMalformed)) as caught:
        open_(".".join(parts))
    assert_safe(caught.value)


def test_reencoded_header_with_the_same_fields_is_undecryptable() -> None:
    # The header is the GCM additional data: even a semantically equal one breaks the tag.
    parts = seal().split(".")
    reencoded = b64(json.dumps(header_of(".".join(parts)), separators=(", ", ":  ")).encode())
    assert reencoded != parts[0]
    parts[0] = reencoded
    refused(SealUndecryptable, ".".join(parts))


def test_moved_epk_from_another_seal_is_undecryptable() -> None:
    first, second = seal().split("."), seal().split(".")
    header = header_of(".".join(first))
    header["epk"] = header_of(".".join(second))["epk"]
    first[0] = b64(header)
    refused(SealUndecryptable, ".".join(first))


FILLER = ".QUFBQUFBQUFBQUFB.QUFBQUFBQUFBQUFB.QUFBQUFBQUFBQUFB.QUFBQUFBQUFBQUFB"


@pytest.mark.parametrize(
    "changes",
    [
        {"alg": "dir"},
        {"alg": "RSA1_5"},
        {"alg": "none"},
        {"alg": "ECDH-ES"},
        {"alg": "A256KW"},
        {"alg": "ECDH-ES+A128KW"},
        {"enc": "A128GCM"},
        {"enc": "A256CBC-HS512"},
        {"alg": None},
        {"cty": "JWT"},
        {"zip": "DEF"},
        {"crit": ["exp"]},
        {"jku": "https://attacker.example/keys"},
        {"kid": "../../etc/passwd"},
        {"kid": None},
        {"epk": None},
    ],
)
def test_hand_built_headers_outside_the_allow_list_are_malformed(changes: dict[str, Any]) -> None:
    header: dict[str, Any] = {**header_of(seal()), **changes}
    header = {name: value for name, value in header.items() if value is not None}
    refused(SealMalformed, b64(header) + FILLER)


def test_genuine_jwe_with_another_algorithm_is_refused() -> None:
    key = ECKey.import_key(json.loads(KEY))
    header = {"alg": "ECDH-ES", "enc": "A256GCM", "kid": "k1", "cty": "tenantflow-seal+json"}
    direct = jwe.encrypt_compact(
        header, b"{}", key, registry=jwe.JWERegistry(algorithms=["ECDH-ES", "A256GCM"])
    )
    assert "ECDH-ES" in refused(SealMalformed, direct)
    # NOTE: and joserfc itself, given the module's registry, refuses it too.
    with pytest.raises(UnsupportedAlgorithmError):
        jwe.decrypt_compact(direct, key, registry=sealing._REGISTRY)


def _seal_payload(payload: dict[str, Any]) -> str:
    header = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "kid": "k1", "cty": sealing.CONTENT_TYPE}
    public = ECKey.import_key(json.loads(public_key(KEY)))
    return jwe.encrypt_compact(header, json.dumps(payload).encode(), public)


GOOD_PAYLOAD: dict[str, Any] = {
    "v": 2,
    "tok": TOKEN,
    "flow": FLOW,
    "clients": [str(CLIENT)],
    "params": parameters_digest({}),
    "iat": int(NOW),
    "exp": int(NOW) + 900,
    "jti": "abc",
}


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 1},
        {"v": 3},
        {"v": True},
        {"v": None},
        {"tok": ""},
        {"tok": 5},
        {"flow": None},
        {"jti": ""},
        {"iat": "1800000000"},
        {"exp": 1.5e9},
        {"exp": int(NOW)},
        {"clients": []},
        {"clients": ["nope"]},
        {"clients": str(CLIENT)},
        {"params": None},
        {"params": "ab" * 31},
        {"params": parameters_digest({}).upper()},
        {"extra": 1},
    ],
)
def test_payload_schema_is_enforced(changes: dict[str, Any]) -> None:
    assert open_(_seal_payload(GOOD_PAYLOAD)).seal_id == "abc"
    refused(SealMalformed, _seal_payload({**GOOD_PAYLOAD, **changes}))


def test_payload_without_a_field_is_malformed() -> None:
    payload = {name: value for name, value in GOOD_PAYLOAD.items() if name != "jti"}
    refused(SealMalformed, _seal_payload(payload))


def test_a_seal_of_the_first_format_without_parameters_is_refused() -> None:
    # The first format bound no parameters: such a seal would open for any period or day.
    first = {name: value for name, value in GOOD_PAYLOAD.items() if name != "params"}
    assert "seal it again" in refused(SealMalformed, _seal_payload({**first, "v": 1}))


# --- parameters --------------------------------------------------------------------------------

PERIOD = {"period_start": "2026-11-01", "period_end": "2026-11-30"}


def _sealed_with(parameters: dict[str, Any]) -> str:
    return seal_access_token(
        TOKEN, public_key(KEY), flow=FLOW, client_ids=[CLIENT], parameters=parameters, now=NOW
    )


def test_a_seal_opens_only_with_the_parameters_it_was_sealed_for() -> None:
    sealed = _sealed_with(PERIOD)
    # The flow receives typed values (dates, ids) where the sealer wrote strings.
    typed = {"period_start": date(2026, 11, 1), "period_end": date(2026, 11, 30)}
    assert open_(sealed, parameters={**typed, "client_id": CLIENT}).seal_id
    for other in (
        {**typed, "period_end": date(2026, 12, 31)},
        {"period_start": date(2026, 11, 1)},
        {**typed, "dry_run": True},
        {},
    ):
        message = refused(SealWrongParameters, sealed, parameters=other)
        assert "other parameters" in message and "2026" not in message


def test_the_token_and_the_clients_are_not_part_of_the_parameters() -> None:
    digest = parameters_digest(PERIOD)
    other_client = {**PERIOD, "client_id": uuid.uuid4(), "client_ids": [uuid.uuid4()]}
    assert parameters_digest({**other_client, "access_token": "x"}) == digest
    assert set(canonical_parameters(other_client)) == set(PERIOD)


def test_unset_parameters_and_defaults_may_be_left_out_when_sealing() -> None:
    sealed = _sealed_with({"revision": "abc123"})
    defaults = {"revision": "head", "dry_run": False, "day": None}
    received = {"revision": "abc123", "dry_run": False, "day": None}
    assert open_(sealed, parameters=received, defaults=defaults).seal_id
    # A parameter away from its default is bound: it cannot be left out.
    refused(
        SealWrongParameters, sealed, parameters={**received, "dry_run": True}, defaults=defaults
    )
    # Sealed with every parameter spelled out opens too.
    full = _sealed_with({"revision": "abc123", "dry_run": False})
    assert open_(full, parameters=received, defaults=defaults).seal_id


def test_canonical_parameters_are_the_same_from_strings_and_from_typed_values() -> None:
    ids = [uuid.uuid4() for _ in range(3)]
    typed = {"day": date(2026, 12, 1), "ids": ids, "n": 3, "flag": False}
    text = {"day": "2026-12-01", "ids": [str(i).upper() for i in reversed(ids)], "n": 3}
    assert parameters_digest(typed) == parameters_digest({**text, "flag": False})
    assert parameters_digest(typed) != parameters_digest({**text, "flag": True})
    with pytest.raises(ValueError, match="JSON"):
        canonical_parameters({"x": object()})


# --- refusals: shape ---------------------------------------------------------------------------


def test_plain_jwt_is_not_sealed_and_says_how_to_seal_it() -> None:
    message = refused(NotSealed, TOKEN)
    assert "plain access token" in message
    assert "tenantflow seal --flow FLOW --client CLIENT_ID" in message
    assert "seal_access_token()" in message


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("", NotSealed),
        ("   \n", NotSealed),
        ("hello", NotSealed),
        ("a.b", NotSealed),
        ("eyJh.b.c.d", NotSealed),
        ("eyJh.b.c.d.e.f", NotSealed),
        ("eyJh.b!.c.d.e", SealMalformed),
        ("eyJh..c.d.e", SealMalformed),
        ("eyJhYmM.b.c.d.e", SealMalformed),  # header: base64 of 'jabc', not JSON
        (b64([1, 2]) + ".b.c.d.e", SealMalformed),
        ("eyJ" + "A" * (16 * 1024) + ".b.c.d.e", SealMalformed),
        (b64(b'{"a":' + b"[" * 9000) + ".b.c.d.e", SealMalformed),  # nesting, not size
    ],
)
def test_garbage_is_refused(value: str, kind: type[SealError]) -> None:
    refused(kind, value)


def test_oversize_says_the_limit() -> None:
    assert "16384 bytes" in refused(SealMalformed, seal() + "A" * (16 * 1024))


def test_non_string_is_not_sealed() -> None:
    with pytest.raises(NotSealed):
        open_(None)  # type: ignore[arg-type]


def test_shape_checks() -> None:
    assert looks_like_plain_jwt(TOKEN) and not looks_sealed(TOKEN)
    assert looks_like_plain_jwt(f" {TOKEN}\n")
    assert not looks_like_plain_jwt("a.b.c") and not looks_like_plain_jwt("eyJa.b")
    assert looks_sealed(seal()) and not looks_sealed(seal() + ".x")
    assert not looks_sealed("eyJa.b.c.d.")


# --- refusals: time ----------------------------------------------------------------------------


def test_expired_says_when_and_to_seal_a_fresh_one() -> None:
    sealed = seal(ttl_s=60)
    assert open_(sealed, now=NOW + 60 + 9).flow == FLOW  # within the leeway
    message = refused(SealExpired, sealed, now=NOW + 60 + 11)
    assert "2027-01-15 08:01:00 UTC" in message
    assert "seal a fresh one" in message


def test_not_yet_valid_beyond_the_leeway() -> None:
    sealed = seal(now=NOW + 60)
    assert open_(sealed, now=NOW + 51).flow == FLOW
    refused(SealNotYetValid, sealed, now=NOW + 49)


def test_too_long_lived_against_the_openers_limit() -> None:
    assert open_(seal(ttl_s=3600), max_ttl_s=3600).flow == FLOW
    message = refused(SealTooLongLived, seal(ttl_s=3601), max_ttl_s=3600)
    assert "3601 s" in message and "3600 s" in message


# --- refusals: binding -------------------------------------------------------------------------


def test_wrong_flow_names_both_flows() -> None:
    message = refused(SealWrongFlow, seal(flow="nightly-rollup"))
    assert "nightly-rollup" in message and FLOW in message


@pytest.mark.parametrize(
    ("sealed_for", "run_for"),
    [
        ([CLIENT], [OTHER]),
        ([CLIENT], [CLIENT, OTHER]),
        ([CLIENT, OTHER], [CLIENT]),
        (None, [CLIENT]),
        ([CLIENT], None),
        ([CLIENT], []),
    ],
    ids=["other", "superset", "subset", "none-vs-list", "list-vs-none", "list-vs-empty"],
)
def test_wrong_clients(sealed_for: list[UUID] | None, run_for: list[UUID] | None) -> None:
    sealed = seal_access_token(TOKEN, public_key(KEY), flow=FLOW, client_ids=sealed_for, now=NOW)
    refused(SealWrongClients, sealed, client_ids=run_for)


def test_clients_compare_as_sets() -> None:
    sealed = seal(clients=[CLIENT, OTHER])
    assert open_(sealed, client_ids=[OTHER, CLIENT, OTHER]).client_ids is not None


def test_checks_run_in_order_time_before_binding() -> None:
    # An expired value for another flow reports the expiry, not the flow.
    refused(SealExpired, seal(flow="other", ttl_s=60), now=NOW + 3600)


# --- settings ----------------------------------------------------------------------------------


def test_settings_accept_a_key_set_and_treat_blank_as_unset() -> None:
    keys = json.dumps({"keys": [json.loads(KEY), json.loads(STRANGER)]})
    settings = load_settings(_env_file=None, **VALID_SETTINGS, seal_private_keys=keys)
    assert settings.seal_private_keys is not None
    assert key_ids(settings.seal_private_keys.get_secret_value()) == ["k1", "k9"]
    assert D not in repr(settings) and D not in str(settings.model_dump())
    assert (settings.seal_max_ttl_s, settings.seal_default_ttl_s) == (3600, 900)
    blank = load_seal_settings(_env_file=None, seal_private_keys="  ")
    assert blank.seal_private_keys is None


@pytest.mark.parametrize(
    "keys", [_key_with(x=json.loads(IMPOSTOR)["x"]), _key_with(crv="P-384"), "{" + D]
)
def test_settings_refuse_a_bad_key_set_without_echoing_it(keys: str) -> None:
    for load in (load_settings, load_seal_settings):
        overrides = VALID_SETTINGS if load is load_settings else {}
        with pytest.raises(SettingsError) as caught:
            load(_env_file=None, **overrides, seal_private_keys=keys)
        assert "SEAL_PRIVATE_KEYS" in str(caught.value)
        assert_safe(caught.value, json.loads(KEY)["x"], json.loads(IMPOSTOR)["x"])


@pytest.mark.parametrize("field", ["seal_max_ttl_s", "seal_default_ttl_s"])
@pytest.mark.parametrize("value", [59, 86_401])
def test_settings_bound_the_lifetimes(field: str, value: int) -> None:
    with pytest.raises(SettingsError, match=field.upper()):
        load_settings(_env_file=None, **VALID_SETTINGS, **{field: value})


# --- the command line --------------------------------------------------------------------------


def _cli(
    *args: str, env: dict[str, str], cwd: Path, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tenantflow.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_cli_generate_public_seal_end_to_end(tmp_path: Path) -> None:
    # NOTE: no DATABASE_URL and no .env in the cwd: the seal commands need only their keys.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    generated = _cli("seal-key", "generate", "--kid", "cli-key", env=env, cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    private = generated.stdout.strip()
    assert key_ids(private) == ["cli-key"] and "\n" not in private
    assert "SEAL_PRIVATE_KEYS" in generated.stderr
    env["SEAL_PRIVATE_KEYS"] = private

    shown = _cli("seal-key", "public", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == public_key(private)
    assert json.loads(private)["d"] not in shown.stdout

    started = time.time()
    sealed = _cli(
        "seal", "--flow", FLOW, "--client", str(CLIENT), "--ttl", "120",
        env=env, cwd=tmp_path, stdin=TOKEN + "\n",
    )  # fmt: skip
    assert sealed.returncode == 0, sealed.stderr
    assert TOKEN not in sealed.stdout + sealed.stderr
    opened = open_sealed_token(
        sealed.stdout.strip(), private, flow=FLOW, client_ids=[CLIENT], parameters={}
    )
    assert opened.token.get_secret_value() == TOKEN
    lifetime = opened.expires_at.timestamp() - opened.issued_at.timestamp()
    assert lifetime == 120 and opened.issued_at.timestamp() >= int(started)

    empty = _cli("seal", "--flow", FLOW, env=env, cwd=tmp_path, stdin="")
    assert empty.returncode == 2 and empty.stdout == ""
    assert empty.stderr.startswith("error: no access token on standard input")
    assert empty.stderr.count("\n") == 1 and "Traceback" not in empty.stderr

    to_private = _cli(
        "seal", "--flow", FLOW, "--public-key", private, env=env, cwd=tmp_path, stdin=TOKEN
    )
    assert to_private.returncode == 2 and to_private.stdout == ""
    assert "private key" in to_private.stderr and "Traceback" not in to_private.stderr
    assert json.loads(private)["d"] not in to_private.stderr


def test_a_long_client_list_is_sealed_by_its_digest_and_bound_all_the_same() -> None:
    private = generate_private_key()
    clients = [uuid.uuid4() for _ in range(CLIENT_LIST_LIMIT * 50)]
    sealed = seal_access_token(
        "header.payload.signature", public_key(private), flow="f", client_ids=clients
    )
    assert len(sealed) < 2000  # a list of a thousand ids would be ~50 KB
    opened = open_sealed_token(
        sealed, private, flow="f", client_ids=list(reversed(clients)), parameters={}
    )
    assert opened.client_ids == tuple(sorted(clients, key=str))
    for other in (clients[:-1], [*clients[:-1], uuid.uuid4()], None):
        with pytest.raises(SealWrongClients, match="sealed by their digest"):
            open_sealed_token(sealed, private, flow="f", client_ids=other, parameters={})
    short = seal_access_token(
        "header.payload.signature",
        public_key(private),
        flow="f",
        client_ids=clients[:CLIENT_LIST_LIMIT],
    )
    assert open_sealed_token(
        short, private, flow="f", client_ids=clients[:CLIENT_LIST_LIMIT], parameters={}
    ).client_ids == tuple(sorted(clients[:CLIENT_LIST_LIMIT], key=str))


def test_cli_seals_for_the_run_parameters_given(tmp_path: Path) -> None:
    private = generate_private_key("cli-key")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "SEAL_PRIVATE_KEYS": private}
    sealed = _cli(
        "seal", "--flow", "migrate", "--param", "dry_run=true", "--param", "revision=abc123",
        env=env, cwd=tmp_path, stdin=TOKEN + "\n",
    )  # fmt: skip
    assert sealed.returncode == 0, sealed.stderr
    assert "other parameters: dry_run=True, revision=abc123" in sealed.stderr
    value = sealed.stdout.strip()
    # `true` is JSON (a bool), `abc123` is text: as the flow receives them.
    received = {"revision": "abc123", "dry_run": True}
    assert open_sealed_token(value, private, flow="migrate", client_ids=None, parameters=received)
    with pytest.raises(SealWrongParameters):
        open_sealed_token(
            value, private, flow="migrate", client_ids=None, parameters={"revision": "abc123"}
        )
    twice = ["--param", "a=1", "--param", "a=2"]
    for bad, says in ((["--param", "dry_run"], "expected NAME=VALUE"), (twice, "given twice")):
        refused = _cli("seal", "--flow", "migrate", *bad, env=env, cwd=tmp_path, stdin=TOKEN)
        assert refused.returncode == 2 and refused.stdout == ""
        assert says in refused.stderr and TOKEN not in refused.stderr
