"""`tenant_flow`: Prefect's `@flow` for a flow that takes an `access_token`.

What every such flow repeated is here once: the hooks that remove a plain token from the
run's stored parameters when the run fails, crashes or is cancelled before its guard
runs, no retries, no persisted result. The flow itself still calls its guard first
(`authorize_run`).

The decorated function is handed to Prefect's `flow` as it is, not wrapped: Prefect
reads the parameter schema (names, types, docstring descriptions, defaults) from the
function's own signature, and `prefect deploy` and the worker load the flow by importing
the entrypoint's module, so both see exactly what a plain `@flow` would.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from prefect import Flow, flow
from prefect.flows import FlowStateHook

from tenantflow.tenancy.run_token import redact_token_on_failure

__all__ = ["tenant_flow"]

P = ParamSpec("P")
R = TypeVar("R")


def tenant_flow(
    *,
    name: str,
    retries: int = 0,
    persist_result: bool = False,
    on_failure: Sequence[FlowStateHook[..., Any]] = (),
    on_crashed: Sequence[FlowStateHook[..., Any]] = (),
    on_cancellation: Sequence[FlowStateHook[..., Any]] = (),
    **options: Any,
) -> Callable[[Callable[P, R]], Flow[P, R]]:
    """Prefect's `@flow(name=..., ...)` for a flow with an `access_token` parameter.

    Args:
        name: the flow's name (what a sealed token is sealed for).
        retries: Prefect's retries; none by default: a refused run is not retried.
        persist_result: Prefect's; off by default.
        on_failure, on_crashed, on_cancellation: more hooks, run after the one that
            redacts the token.
        options: every other argument of Prefect's `flow` (`description`,
            `timeout_seconds`, `log_prints`, ...), passed on as given.

    Raises:
        TypeError: the function takes no `access_token` parameter.
    """

    def decorate(fn: Callable[P, R]) -> Flow[P, R]:
        # NOTE: the hooks redact the stored `access_token` parameter; a flow that names its
        # token otherwise would keep a plain one, so it is refused when it is defined.
        if "access_token" not in inspect.signature(fn).parameters:
            raise TypeError(
                f"tenant flow {name} takes no access_token parameter "
                "(type it tenantflow.tenancy.SealedAccessToken)"
            )
        redact: list[FlowStateHook[..., Any]] = [redact_token_on_failure]
        decorator = flow(
            name=name,
            retries=retries,
            persist_result=persist_result,
            on_failure=[*redact, *on_failure],
            on_crashed=[*redact, *on_crashed],
            on_cancellation=[*redact, *on_cancellation],
            **options,
        )
        return decorator(fn)

    return decorate
