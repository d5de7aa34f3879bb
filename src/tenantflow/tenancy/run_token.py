"""A flow run's `access_token` parameter: its type, opening it, and keeping it sealed.

Tokens reach a flow run sealed to the workers (`tenantflow.sealing`): Prefect stores and
shows only ciphertext. A seal is bound to the flow and its clients, expires soon, and is
good for one flow run: the first run that opens it records that in the database.

A plain token reaches Prefect only when someone creates a run around the parameter
schema; it is replaced in the run's stored parameters as soon as it is seen: when the
guard opens the parameter, or by the flow's failure and crash hooks when the run fails
before its guard runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, Final, TypeVar
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from pydantic import SecretStr, WithJsonSchema
from sqlalchemy import text

from tenantflow.sealing import OpenedSeal, SealError, looks_like_plain_jwt, open_sealed_token
from tenantflow.settings import Settings
from tenantflow.tenancy.actors import AccessDenied
from tenantflow.tenancy.sessions import guard_unit

T = TypeVar("T")

__all__ = [
    "REDACTED",
    "SCHEMA_EXPECTED",
    "SPENT",
    "OptionalSealedAccessToken",
    "SealedAccessToken",
    "open_run_token",
    "redact_token_on_failure",
    "redact_token_parameter",
]

#: What a plain (unsealed) token found in a run's stored parameters is replaced with.
REDACTED: Final = "[redacted by tenantflow: a plain access token is never kept]"
#: What a sealed token is replaced with once its run has ended (the workers' housekeeping):
#: it can open nothing any more, and a copy of it could not be replayed either.
SPENT: Final = "[removed by tenantflow: a sealed token is good for one run]"

#: The one value the parameter schema lets through that is not shaped as a sealed token:
#: what the server's refusal of any other value says was expected (the guard refuses it).
SCHEMA_EXPECTED: Final = "a sealed access token (tenantflow seal)"

_SEALED_SHAPE: Final = {
    "not": {"pattern": r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){4}$", "maxLength": 16384}
}
_DESCRIPTION: Final = (
    "A sealed access token for exactly this run: `tenantflow seal --flow FLOW --client "
    "CLIENT_ID --param NAME=VALUE ...` (or tenantflow.sealing.seal_access_token) turns a "
    "Supabase access token into one, bound to the run's flow, clients and other "
    "parameters. A plain access token is refused."
)

# NOTE: the whole JSON schema is given, so the run form and the server see exactly a
# string of this shape (pydantic's own schema of SecretStr would add `writeOnly`).
# The shape is checked as `if: not sealed-shaped, then: const`: the server's refusal
# (409) quotes the expected `const`, never the value (a `pattern`, `maxLength` or `anyOf`
# refusal would echo a plain JWT back into the response, the UI and whatever logs it).
# The check is in the JSON schema only (which the server enforces when a run is
# created): one that pydantic ran in the flow would make Prefect log the refused value;
# the guard refuses it instead, without repeating it.
# `format: password` gives the run form a one-line box: the value is ciphertext, but
# about 2 KB without a space, which a text area spreads across the page.

#: The type of a flow's required `access_token` parameter: a sealed token (JWE compact
#: serialization, five base64url segments), which the flow receives as a `SecretStr`.
#: With the deployment's parameter schema enforced, the Prefect server refuses anything
#: else (a plain JWT pasted by mistake) before it stores it; the guard refuses it again,
#: and removes it, for runs created around the schema.
SealedAccessToken = Annotated[
    SecretStr,
    WithJsonSchema(
        {
            "type": "string",
            "format": "password",
            "if": _SEALED_SHAPE,
            "then": {"const": SCHEMA_EXPECTED},
            "description": _DESCRIPTION,
        }
    ),
]

#: The same, for a flow whose token may be left out (the scheduler's runs have none).
OptionalSealedAccessToken = Annotated[
    SecretStr | None,
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "format": "password"}, {"type": "null"}],
            # NOTE: outside the `anyOf`, whose refusal would repeat the value.
            "if": {"type": "string", **_SEALED_SHAPE},
            "then": {"const": SCHEMA_EXPECTED},
            "description": _DESCRIPTION,
        }
    ),
]


async def redact_token_parameter(flow_run: FlowRun) -> None:
    """Replace a plain token in the run's stored `access_token` parameter.

    Sealed tokens are ciphertext and stay; a plain JWT reaches Prefect only when someone
    created the run around the parameter schema, and is removed as soon as it is seen.
    """
    stored = flow_run.parameters.get("access_token")
    if not isinstance(stored, str) or not looks_like_plain_jwt(stored):
        return
    parameters = {**flow_run.parameters, "access_token": REDACTED}
    async with get_client() as client:
        await client.update_flow_run(flow_run.id, parameters=parameters)


async def redact_token_on_failure(flow: Any, flow_run: FlowRun, state: State[Any] | None) -> None:
    """Flow hook (`on_failure`, `on_crashed`, `on_cancellation`): a run that ended before
    its guard ran (on invalid parameters, say) still gets a plain token removed from its
    parameters."""
    await redact_token_parameter(flow_run)


async def _use_seal(settings: Settings, opened: OpenedSeal, flow_run_id: UUID) -> UUID:
    """Record that `flow_run_id` opened the seal; returns the run that holds it."""
    async with guard_unit(settings) as session:
        holder: UUID = (
            await session.execute(
                text(
                    "SELECT tenantflow_private.use_seal("
                    "CAST(:seal_id AS text), CAST(:flow_run_id AS uuid), "
                    "CAST(:flow AS text), CAST(:expires_at AS timestamptz))"
                ),
                {
                    "seal_id": opened.seal_id,
                    "flow_run_id": flow_run_id,
                    "flow": opened.flow,
                    "expires_at": opened.expires_at,
                },
            )
        ).scalar_one()
    return holder


async def open_run_token(
    settings: Settings,
    access_token: SecretStr,
    flow_run: FlowRun | None,
    flow: str,
    client_ids: Sequence[UUID] | None,
    *,
    parameters: Mapping[str, Any],
    defaults: Mapping[str, Any],
    verify: Callable[[SecretStr], Awaitable[T]],
) -> T:
    """Open the run's sealed token, claim it for this run (single use), and `verify` the
    access token inside it (still a `SecretStr`); what `verify` returns.

    `parameters` are the arguments the flow function received (not the stored
    parameters, which the Prefect API can change at any time), `defaults` its
    signature's: the seal must have been made for exactly those.

    NOTE: the claim (a transaction) and the verification (Supabase Auth, the operator
    grant) run at once, and are judged in that order: a seal another run holds is
    refused as such whatever the verification says, and the seal is claimed however the
    verification ends, as when they ran one after the other.
    """
    # NOTE: the only place tenancy reads a token's value: the sealed value is looked at
    # (is it a plain JWT, or the placeholder?) and handed to `tenantflow.sealing`. The
    # token inside stays a `SecretStr` up to `tenantflow.auth`, which takes one.
    value = access_token.get_secret_value()
    if flow_run is not None and looks_like_plain_jwt(value):
        await redact_token_parameter(flow_run)
    if value == SCHEMA_EXPECTED:
        raise AccessDenied(
            "this run's access_token is not a sealed access token; "
            "start a new run with one (tenantflow seal)"
        )
    if value == SPENT:
        raise AccessDenied(
            "this run's sealed access token was removed when the run ended (a sealed token "
            "is good for one execution of one run); start a new run with a fresh one"
        )
    if value == REDACTED:
        raise AccessDenied(
            "this run's access_token was a plain access token and has been removed; "
            "start a new run with a sealed access token (tenantflow seal)"
        )
    if flow_run is None:
        raise AccessDenied("a sealed access token is only opened inside a flow run")
    if settings.seal_private_keys is None:
        raise AccessDenied(
            "this worker cannot open sealed access tokens: SEAL_PRIVATE_KEYS is not set "
            "in its environment (tenantflow seal-key generate)"
        )
    try:
        opened = open_sealed_token(
            value,
            settings.seal_private_keys.get_secret_value(),
            flow=flow,
            client_ids=client_ids,
            parameters=parameters,
            defaults=defaults,
            max_ttl_s=settings.seal_max_ttl_s,
            leeway_s=settings.auth_leeway_s,
        )
    except SealError as error:
        raise AccessDenied(f"sealed access token refused: {error}") from None
    verified = asyncio.ensure_future(verify(opened.token))
    try:
        holder = await _use_seal(settings, opened, flow_run.id)
        if holder != flow_run.id:
            raise AccessDenied(
                f"sealed access token refused: it was already used by flow run {holder}; "
                "a sealed token is good for one run, seal a fresh one for this run"
            )
    except BaseException:
        verified.cancel()
        with contextlib.suppress(BaseException):
            await verified
        raise
    return await verified
