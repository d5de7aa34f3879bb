"""The tripwire: Prefect's loaders of code taken from the API refuse, loudly.

Whoever reaches the Prefect API can change a deployment's entrypoint and pull steps, and
pull steps are code (`run_shell_script`). The tenantflow worker never asks Prefect to load
a flow from a deployment: it loads the entrypoint its own `prefect.yaml` declares
(`tenantflow.worker`). This module makes sure nothing else does either, in the worker and
in the flow-run processes: `install_tripwire()` replaces, in every loaded `prefect` module
that holds them, the functions through which Prefect runs a deployment's pull steps or
storage and imports its entrypoint:

* `prefect.flows.load_flow_from_flow_run` (pull steps, storage, then the entrypoint);
* `prefect.deployments.steps.core.run_steps` and `run_step` (any step);
* `prefect.runner._workspace_resolver.prepare_workspace` and
  `prepare_workspace_for_flow_run` (the workspace starter's pull steps and storage).

Each is replaced by `refuse_code_from_the_api`, which logs and raises `ForbiddenCodePath`,
so a path of Prefect's that tenantflow missed (or a new one in a Prefect upgrade) fails
closed instead of running the attacker's code. A module imported later takes the
replacement from the module it imports it from. Installed by the worker at start-up and
by `tenantflow.tenancy` (so in every flow-run process of a tenant flow); idempotent.

The list of Prefect's code paths and how each is locked: docs/security.md.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, NoReturn

from tenantflow.errors import TenantflowError

__all__ = ["TRIPPED", "ForbiddenCodePath", "install_tripwire", "refuse_code_from_the_api"]

log = logging.getLogger("tenantflow.tripwire")

#: (module, function) pairs that load code a deployment names through the API.
TRIPPED: tuple[tuple[str, str], ...] = (
    ("prefect.flows", "load_flow_from_flow_run"),
    ("prefect.deployments.steps.core", "run_steps"),
    ("prefect.deployments.steps.core", "run_step"),
    ("prefect.runner._workspace_resolver", "prepare_workspace"),
    ("prefect.runner._workspace_resolver", "prepare_workspace_for_flow_run"),
)


class ForbiddenCodePath(TenantflowError, RuntimeError):
    """Prefect was about to run a deployment's pull steps or import its entrypoint."""


def refuse_code_from_the_api(*_: Any, **__: Any) -> NoReturn:
    """Stands in for each function of `TRIPPED`: refuses at once, before any await.

    Raises:
        ForbiddenCodePath: always.
    """
    message = (
        "refused: Prefect tried to load a flow or run steps from a deployment as the API "
        "stores it (its pull steps, storage or entrypoint); tenantflow runs only the "
        "entrypoints its own prefect.yaml declares (see docs/security.md)"
    )
    log.error("%s", message)
    raise ForbiddenCodePath(message)


def install_tripwire() -> None:
    """Replace every `TRIPPED` function in every loaded module that holds it."""
    originals: list[object] = []
    for module_name, name in TRIPPED:
        module = importlib.import_module(module_name)
        current = getattr(module, name)
        if current is not refuse_code_from_the_api:
            originals.append(current)
            setattr(module, name, refuse_code_from_the_api)
    if not originals:
        return
    # NOTE: `from prefect.flows import load_flow_from_flow_run` copied the function into
    # modules loaded before now (prefect.flow_engine, prefect.workers.process,
    # prefect.runner.runner, ...): replace it wherever it is, by identity.
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("prefect"):
            continue
        namespace = getattr(module, "__dict__", {})
        for name, value in list(namespace.items()):
            if any(value is original for original in originals):
                setattr(module, name, refuse_code_from_the_api)
