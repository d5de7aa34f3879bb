"""Starting and watching runs of the project's deployments: the SaaS backend and operators.

`start_run()` is the one call the SaaS backend makes to run a flow for a user: it checks the
deployment is one this project declares, builds the run's parameters from the deployment's
parameter schema (the client parameter, then the caller's), seals the user's access token to
the workers' public key for exactly that run, creates the run through the Prefect API and
returns its id at once. The caller needs only the Prefect API URL and auth string and the
workers' *public* key: never the private key, never a database URL.

`watch_run()` follows a run to a final state for an operator (`tenantflow run --watch`):
its state changes, its log lines, then the links to its artifacts.

Every refusal is a `LaunchError` of one line that never holds the token, the sealed value
or a parameter's value (the Prefect server's own validation messages quote the refused
value, so they are never passed on).

How the backend uses it: docs/operations.md.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import SecretStr
from pydantic_core import PydanticSerializationError, to_jsonable_python

from tenantflow.errors import TenantflowError
from tenantflow.project import PROJECT_DIR_ENV, DeployError, declared_deployment, deployment_names
from tenantflow.sealing import UNBOUND_PARAMETERS, seal_access_token

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import Log, State
    from prefect.client.schemas.responses import DeploymentResponse

__all__ = [
    "FlowRunOutcome",
    "LaunchError",
    "artifact_url",
    "run_url",
    "start_run",
    "watch_run",
]

#: The tag every tenantflow deployment carries (prefect.yaml): without the project's file,
#: the only sign in the API that a deployment is one of ours.
PROJECT_TAG = "tenantflow"
_FINAL = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
_MAX_NAME = 200
#: How far back each poll re-reads logs: a batch may reach the API a little after later lines.
_LOG_OVERLAP = timedelta(seconds=60)
_LOG_PAGE = 200


class LaunchError(TenantflowError):
    """A run could not be started or followed. One line, never a token or a value."""


# --- links ------------------------------------------------------------------------------------


def _ui_url(api_url: str | None = None) -> str | None:
    """The UI's base URL: PREFECT_UI_URL, else the API URL without its `/api`."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    configured = (settings.api.url or "").rstrip("/")
    if settings.ui_url and (api_url is None or api_url.rstrip("/") == configured):
        return str(settings.ui_url).rstrip("/")
    base = (api_url or configured).rstrip("/")
    if not base:
        return None
    return base[: -len("/api")] if base.endswith("/api") else base


def run_url(flow_run_id: UUID | str, *, api_url: str | None = None) -> str | None:
    """The flow run's page in the Prefect UI (`<ui>/runs/flow-run/<id>`, both Prefect 3 UIs),
    or None when no API or UI URL is configured.

    Args:
        flow_run_id: The run.
        api_url: The API the run lives on, when not the configured one (the UI is then
            that URL without `/api`).
    """
    base = _ui_url(api_url)
    return f"{base}/runs/flow-run/{flow_run_id}" if base else None


def artifact_url(artifact_id: UUID | str, *, api_url: str | None = None) -> str | None:
    """An artifact's page in the Prefect UI (`<ui>/artifacts/artifact/<id>`), or None."""
    base = _ui_url(api_url)
    return f"{base}/artifacts/artifact/{artifact_id}" if base else None


# --- errors -----------------------------------------------------------------------------------


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _name(value: object, limit: int = 60) -> str:
    """A caller-supplied *name* (never a value) for a message, shortened."""
    text = _one_line(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@asynccontextmanager
async def _prefect(client: PrefectClient | None) -> AsyncIterator[PrefectClient]:
    """The caller's client, or one from the Prefect settings; API failures as one line."""
    import httpx
    from prefect.client.orchestration import get_client

    owned = client is None
    prefect_client = get_client() if client is None else client
    api = "the Prefect API"
    try:
        if owned:
            await prefect_client.__aenter__()
        api = f"the Prefect API at {prefect_client.api_url}"
        yield prefect_client
    except httpx.HTTPStatusError as error:
        status = error.response.status_code
        if status in (401, 403):
            raise LaunchError(
                f"{api} refused the auth string ({status}): check PREFECT_API_AUTH_STRING"
            ) from None
        # NOTE: never the response's text: a validation message quotes the refused value.
        raise LaunchError(f"{api} answered {status} to {error.request.method}") from None
    except httpx.TimeoutException:
        raise LaunchError(f"{api} did not answer in time") from None
    except httpx.RequestError as error:
        raise LaunchError(f"{api} does not answer ({type(error).__name__})") from None
    finally:
        if owned:
            await prefect_client.__aexit__(None, None, None)


# --- which deployment -------------------------------------------------------------------------


def _checkout() -> Path:
    """The source checkout beside this package (it holds prefect.yaml in development)."""
    return Path(__file__).resolve().parents[2]


def _project_dir(project_dir: Path | None) -> Path | None:
    """The folder whose prefect.yaml declares the deployments, or None: the API decides.

    NOTE: the current directory is not looked at: a backend may run anywhere, beside
    another project's prefect.yaml. TENANTFLOW_PROJECT_DIR, when set, must hold the file.
    """
    if project_dir is not None:
        if not (project_dir / "prefect.yaml").is_file():
            raise LaunchError(f"{project_dir / 'prefect.yaml'} does not exist")
        return project_dir
    named = os.environ.get(PROJECT_DIR_ENV)
    if named:
        if not (Path(named) / "prefect.yaml").is_file():
            raise LaunchError(f"{PROJECT_DIR_ENV}={named} holds no prefect.yaml")
        return Path(named)
    checkout = _checkout()
    if (checkout / "prefect.yaml").is_file() and (checkout / "flows").is_dir():
        return checkout
    return None


@dataclass(frozen=True)
class _Target:
    deployment: DeploymentResponse
    flow: str
    label: str

    @property
    def schema(self) -> dict[str, Any]:
        return dict(self.deployment.parameter_openapi_schema or {})


async def _api_deployments(client: PrefectClient, flow: str, name: str) -> list[DeploymentResponse]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
    )

    return await client.read_deployments(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])) if flow else None,
        limit=20,
    )


async def _resolve(client: PrefectClient, deployment: str, project_dir: Path | None) -> _Target:
    """The API deployment behind `deployment`, if the project declares it.

    With prefect.yaml: the name must be declared there, and the API deployment must run the
    declared entrypoint. Without it (a backend that ships no project): the API deployment
    must carry the `tenantflow` tag and enforce its parameter schema, which `start_run`
    then validates the run against.
    """
    if not isinstance(deployment, str) or not deployment.strip() or len(deployment) > _MAX_NAME:
        raise LaunchError("deployment must be a deployment name, e.g. client-report")
    flow, _, name = deployment.strip().rpartition("/")
    folder = _project_dir(project_dir)
    declared = None
    if folder is not None:
        try:
            declared = declared_deployment(name, folder)
            if declared is None:
                known = ", ".join(deployment_names(folder))
                raise LaunchError(
                    f"unknown deployment {_name(deployment)}: {folder / 'prefect.yaml'} "
                    f"declares {known}"
                )
        except DeployError as error:
            raise LaunchError(str(error)) from None
    found = await _api_deployments(client, flow, name)
    if declared is not None:
        found = [d for d in found if d.entrypoint == declared.entrypoint]
    else:
        found = [d for d in found if PROJECT_TAG in d.tags and d.enforce_parameter_schema]
    if not found and declared is not None:
        raise LaunchError(
            f"unknown deployment {_name(deployment)}: declared in prefect.yaml but not deployed "
            f"to the Prefect API at {client.api_url} (run `tenantflow deploy`)"
        )
    if not found:
        raise LaunchError(
            f"unknown deployment {_name(deployment)}: no tenantflow deployment of that name "
            f"in the Prefect API at {client.api_url}"
        )
    if len(found) > 1:
        raise LaunchError(
            f"several flows have a deployment {_name(name)}: name it as FLOW/DEPLOYMENT"
        )
    [chosen] = found
    flow_name = (await client.read_flow(chosen.flow_id)).name
    return _Target(deployment=chosen, flow=flow_name, label=f"{flow_name}/{chosen.name}")


# --- parameters -------------------------------------------------------------------------------


def _jsonable(parameters: Mapping[str, Any]) -> dict[str, Any]:
    try:
        plain = to_jsonable_python(dict(parameters))
    except PydanticSerializationError:
        raise LaunchError("a parameter value cannot be expressed in JSON") from None
    return dict(plain)


def _clients(client_ids: Sequence[UUID | str] | None) -> list[str] | None:
    if client_ids is None:
        return None
    if isinstance(client_ids, str | bytes):
        raise LaunchError("client_ids must be a list of client ids, not a single string")
    try:
        return [str(UUID(str(client))) for client in client_ids]
    except ValueError:
        raise LaunchError("client_ids: not all valid client ids (UUIDs)") from None


def _describe(error: Any) -> str:
    """A jsonschema error as `name: reason`, never quoting the refused value."""
    path = ".".join(str(part) for part in error.absolute_path) or "parameters"
    keyword, expected = error.validator, error.validator_value
    if keyword in ("anyOf", "oneOf") and error.context:
        # NOTE: `day: null or a date` fails both branches; the format one says more.
        branches = [e for e in error.context if e.validator != "type"] or list(error.context)
        return _describe(min(branches, key=lambda e: -len(e.absolute_path)))
    if keyword == "required":
        present = error.instance if isinstance(error.instance, Mapping) else {}
        missing = [str(name) for name in expected if name not in present]
        return f"{', '.join(missing) or path}: required"
    if path == "access_token" or (keyword == "const" and "sealed" in str(expected)):
        return "access_token: not a sealed access token"
    kinds = " or ".join(expected) if isinstance(expected, list) else expected
    reasons = {
        "format": f"not a valid {expected}",
        "type": f"must be of type {kinds}",
        "enum": "not one of the allowed values",
        "const": "not the allowed value",
        "pattern": "not of the expected form",
        "minimum": f"must be at least {expected}",
        "maximum": f"must be at most {expected}",
        "exclusiveMinimum": f"must be more than {expected}",
        "exclusiveMaximum": f"must be less than {expected}",
        "minLength": f"shorter than {expected} characters",
        "maxLength": f"longer than {expected} characters",
        "minItems": f"fewer than {expected} items",
        "maxItems": f"more than {expected} items",
        "uniqueItems": "holds an item twice",
        "additionalProperties": "holds a name the schema does not allow",
    }
    return f"{path}: {reasons.get(keyword, f'not valid ({keyword})')}"


def _validate(target: _Target, parameters: Mapping[str, Any]) -> None:
    """Check the run's parameters against the deployment's schema, formats included.

    NOTE: the Prefect server enforces the schema but not its formats (a `period_end` of
    `notadate` is accepted), and its messages quote the refused value; so the check is made
    here, and its messages are our own.
    """
    # NOTE: jsonschema comes with Prefect (it validates parameters the same way).
    from jsonschema import (  # type: ignore[import-untyped]
        Draft202012Validator,
        FormatChecker,
    )

    validator = Draft202012Validator(target.schema, format_checker=FormatChecker())
    errors = sorted(validator.iter_errors(dict(parameters)), key=lambda e: list(e.absolute_path))
    if errors:
        reasons = "; ".join(dict.fromkeys(_describe(error) for error in errors))
        raise LaunchError(f"{target.label}: {reasons}")


def _server_refusal(target: _Target, detail: str) -> LaunchError:
    """A 409/422 of the server, as one line naming the parameter, never its value."""
    import re

    field = re.search(r"for field '([A-Za-z_][A-Za-z0-9_.]*)'", detail)
    required = re.search(r"'([A-Za-z_][A-Za-z0-9_]*)' is a required property", detail)
    if field:
        reason = f"{field.group(1)}: refused by the deployment's parameter schema"
    elif required:
        reason = f"{required.group(1)}: required"
    else:
        reason = "the parameters were refused by the deployment's parameter schema"
    return LaunchError(f"{target.label}: {reason}")


def _run_parameters(
    target: _Target,
    client_ids: list[str] | None,
    parameters: Mapping[str, Any] | None,
    token: str | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parameters to send but the seal, and those the seal binds (the deployment's own
    defaults included: the server merges them into the run)."""
    properties = dict(target.schema.get("properties") or {})
    given = _jsonable(parameters or {})
    reserved = sorted(set(given) & UNBOUND_PARAMETERS)
    if reserved:
        raise LaunchError(
            f"{', '.join(reserved)}: pass the clients as client_ids= and the token as "
            "access_token=, not as parameters"
        )
    unknown = sorted(set(given) - set(properties))
    if unknown:
        takes = ", ".join(sorted(set(properties) - UNBOUND_PARAMETERS)) or "none"
        raise LaunchError(
            f"{target.label} has no parameter {', '.join(_name(n, 40) for n in unknown)} "
            f"(its parameters: {takes})"
        )
    run = dict(given)
    if "client_id" in properties:
        if not client_ids or len(client_ids) != 1:
            raise LaunchError(f"{target.label} runs for exactly one client: give one client id")
        run["client_id"] = client_ids[0]
    elif "client_ids" in properties:
        if client_ids is not None:
            if not client_ids:
                raise LaunchError("client_ids is empty: give None for every active client")
            run["client_ids"] = client_ids
    elif client_ids:
        raise LaunchError(f"{target.label} takes no client ids")
    if token is None and "access_token" in (target.schema.get("required") or ()):
        raise LaunchError(f"{target.label} needs an access token")
    if token is not None and "access_token" not in properties:
        raise LaunchError(f"{target.label} takes no access token")
    bound = {**dict(target.deployment.parameters or {}), **given}
    return run, bound


def _plain_token(access_token: str | SecretStr | None) -> str | None:
    if isinstance(access_token, SecretStr):
        return access_token.get_secret_value()
    return access_token


async def start_run(
    deployment: str,
    *,
    access_token: str | SecretStr | None,
    public_key: str | Mapping[str, Any],
    client_ids: Sequence[UUID | str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    ttl_s: int = 900,
    client: PrefectClient | None = None,
    project_dir: Path | None = None,
) -> UUID:
    """Start one run of a declared deployment for a user; return its id at once.

    The user's access token is sealed to the workers for exactly this run (its flow, its
    clients, every other parameter, `ttl_s`) and passed as a plain string; the caller
    never holds a private key or a database URL.

    Args:
        deployment: The deployment's name as prefect.yaml declares it (`client-report`), or
            Prefect's `flow/deployment`.
        access_token: The user's Supabase access token; None for a deployment without one
            (`noop`; a scheduled-style run is not something a caller can start).
        public_key: The workers' public JWK (`tenantflow seal-key public`).
        client_ids: The run's clients: one for `client-report` (`client_id`); a list, or
            None for every active client, for `nightly-rollup` (`client_ids`); none for
            `migrate`.
        parameters: The run's other parameters (`period_start`, `day`, `revision`...),
            as JSON values or dates/UUIDs.
        ttl_s: The seal's lifetime, in seconds (the workers accept at most SEAL_MAX_TTL_S).
        client: A Prefect client to use; by default one from the Prefect settings
            (PREFECT_API_URL, PREFECT_API_AUTH_STRING).
        project_dir: The folder holding prefect.yaml; by default TENANTFLOW_PROJECT_DIR or
            the source checkout, else none: the Prefect API's deployment is then accepted
            only if it carries the `tenantflow` tag and enforces its parameter schema.

    Returns:
        The new flow run's id (it is not yet final: follow it with `watch_run`).

    Raises:
        LaunchError: An unknown deployment, a parameter refused by its schema (named, its
            value never shown), an unusable token or key, or the Prefect API refused.
    """
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    token = _plain_token(access_token)
    clients = _clients(client_ids)
    async with _prefect(client) as prefect_client:
        target = await _resolve(prefect_client, deployment, project_dir)
        run, bound = _run_parameters(target, clients, parameters, token)
        if token is not None:
            try:
                run["access_token"] = seal_access_token(
                    token,
                    public_key,
                    flow=target.flow,
                    client_ids=clients,
                    parameters=bound,
                    ttl_s=ttl_s,
                )
            except ValueError as error:
                # NOTE: sealing's messages never hold the token or a key.
                raise LaunchError(f"cannot seal the access token: {error}") from None
        _validate(target, {**dict(target.deployment.parameters or {}), **run})
        try:
            flow_run = await prefect_client.create_flow_run_from_deployment(
                target.deployment.id, parameters=run
            )
        except ObjectNotFound:
            raise LaunchError(f"{target.label} was removed from the Prefect API") from None
        except PrefectHTTPStatusError as error:
            if error.response.status_code in (409, 422):
                raise _server_refusal(target, error.response.text) from None
            raise
    return flow_run.id


# --- watching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowRunOutcome:
    """A run's final state, as `watch_run` saw it.

    Attributes:
        flow_run_id: The run.
        state_type: Prefect's state type (`COMPLETED`, `FAILED`, `CRASHED`, `CANCELLED`).
        state_name: The state's name (`Completed`, `Failed`, ...).
        message: The state's message in one line ("" if none).
        url: The run's page in the UI, if one is configured.
        artifact_urls: The UI pages of its artifacts.
    """

    flow_run_id: UUID
    state_type: str
    state_name: str
    message: str
    url: str | None
    artifact_urls: tuple[str, ...] = ()

    @property
    def completed(self) -> bool:
        return self.state_type == "COMPLETED"


class _LogReader:
    """A run's log lines in timestamp order, each once."""

    def __init__(self, client: PrefectClient, flow_run_id: UUID) -> None:
        self._client = client
        self._run = flow_run_id
        self._seen: set[UUID] = set()
        self._latest: datetime | None = None

    async def new_lines(self) -> list[Log]:
        from prefect.client.schemas.filters import (
            LogFilter,
            LogFilterFlowRunId,
            LogFilterTimestamp,
        )
        from prefect.client.schemas.sorting import LogSort

        since = None if self._latest is None else self._latest - _LOG_OVERLAP
        log_filter = LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[self._run]),
            timestamp=LogFilterTimestamp(after_=since) if since else None,
        )
        fresh: list[Log] = []
        offset = 0
        while True:
            page = await self._client.read_logs(
                log_filter=log_filter, limit=_LOG_PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC
            )
            fresh.extend(log for log in page if log.id not in self._seen)
            if len(page) < _LOG_PAGE:
                break
            offset += len(page)
        for log in fresh:
            self._seen.add(log.id)
            if self._latest is None or log.timestamp > self._latest:
                self._latest = log.timestamp
        return fresh


def _log_line(log: Log) -> str:
    import logging

    level = logging.getLevelName(log.level)
    head, *rest = str(log.message).splitlines() or [""]
    text = f"{log.timestamp:%H:%M:%S} {level:<7} {head}"
    return "\n".join([text, *(f"    {line}" for line in rest)])


def _state_line(state: State[Any]) -> str:
    message = _one_line(state.message or "")
    return f"state: {state.name}" + (f": {message}" if message else "")


async def watch_run(
    flow_run_id: UUID,
    *,
    printer: Callable[[str], None],
    poll_s: float = 1.0,
    settle_s: float = 5.0,
    client: PrefectClient | None = None,
) -> FlowRunOutcome:
    """Follow a run to a final state: print each state change and each log line as they
    come, then the links to its artifacts; return the final state.

    Args:
        flow_run_id: The run (`start_run`'s result).
        printer: Called with each line to show (a state, a log line, a link).
        poll_s: Seconds between polls of the Prefect API.
        settle_s: After the final state, how long to keep reading log lines that are still
            on their way (the run's last batch reaches the API after its state).
        client: A Prefect client; by default one from the Prefect settings.

    Raises:
        LaunchError: No such run, or the Prefect API refused or does not answer.
    """
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.exceptions import ObjectNotFound

    async with _prefect(client) as prefect_client:
        api_url = str(prefect_client.api_url)
        logs = _LogReader(prefect_client, flow_run_id)
        shown: set[UUID] = set()
        final = None
        while final is None:
            try:
                flow_run = await prefect_client.read_flow_run(flow_run_id)
            except ObjectNotFound:
                raise LaunchError(f"no flow run {flow_run_id} in the Prefect API") from None
            # NOTE: the state history, not the current state: a short state (Running, for a
            # quick flow) may come and go between two polls.
            history = await prefect_client.read_flow_run_states(flow_run_id)
            lines: list[tuple[datetime, str]] = [
                (state.timestamp, _state_line(state)) for state in history if state.id not in shown
            ]
            shown.update(state.id for state in history)
            lines += [(log.timestamp, _log_line(log)) for log in await logs.new_lines()]
            for _, line in sorted(lines, key=lambda pair: pair[0]):
                printer(line)
            state = flow_run.state
            if state is not None and state.type.value in _FINAL:
                final = state
            else:
                await asyncio.sleep(poll_s)
        loop = asyncio.get_running_loop()
        settled = loop.time() + settle_s
        while loop.time() < settled:
            await asyncio.sleep(min(poll_s, settle_s))
            for log in await logs.new_lines():
                printer(_log_line(log))
        artifacts = await prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    urls: list[str] = []
    for artifact in artifacts:
        url = artifact_url(artifact.id, api_url=api_url)
        if url:
            urls.append(url)
            printer(f"artifact {artifact.key or artifact.type or artifact.id}: {url}")
    link = run_url(flow_run_id, api_url=api_url)
    return FlowRunOutcome(
        flow_run_id=flow_run_id,
        state_type=final.type.value,
        state_name=str(final.name or final.type.value.title()),
        message=_one_line(final.message or ""),
        url=link,
        artifact_urls=tuple(urls),
    )
