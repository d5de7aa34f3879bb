"""tenantflow's local dev stack: everything tenantflow needs, on this machine, in one folder.

A dev-only distribution (`tenantflow-devstack`), never in the worker image: it may import
the product (`tenantflow`), the product never imports it. `Stack` (in `stack.py`) starts and
stops the stack; `tenantflow-dev` (`cli.py`) is its command.

The package itself imports nothing heavy, so `tenantflow_dev.config` can be read before
Prefect is imported (Prefect reads its settings once, on import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tenantflow_dev.config import StackConfig
    from tenantflow_dev.errors import StackError
    from tenantflow_dev.stack import Stack

__all__ = ["Stack", "StackConfig", "StackError"]


def __getattr__(name: str) -> Any:
    if name == "Stack":
        from tenantflow_dev.stack import Stack

        return Stack
    if name == "StackConfig":
        from tenantflow_dev.config import StackConfig

        return StackConfig
    if name == "StackError":
        from tenantflow_dev.errors import StackError

        return StackError
    raise AttributeError(name)
