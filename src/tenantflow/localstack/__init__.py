"""The local stack: everything tenantflow needs, on this machine, in one folder.

`Stack` (in `stack.py`) starts and stops it. The package itself imports nothing heavy,
so `tenantflow.localstack.config` can be read before Prefect is imported (Prefect reads
its settings once, on import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tenantflow.localstack.config import StackConfig
    from tenantflow.localstack.services import StackError
    from tenantflow.localstack.stack import Stack

__all__ = ["Stack", "StackConfig", "StackError"]


def __getattr__(name: str) -> Any:
    if name == "Stack":
        from tenantflow.localstack.stack import Stack

        return Stack
    if name == "StackConfig":
        from tenantflow.localstack.config import StackConfig

        return StackConfig
    if name == "StackError":
        from tenantflow.localstack.services import StackError

        return StackError
    raise AttributeError(name)
