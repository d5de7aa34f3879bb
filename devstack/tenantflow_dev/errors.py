"""What the dev stack raises when the local stack cannot be brought to the asked state.

`StackError` derives from the product's `TenantflowError`: its message is safe to show (it
names a part, a port or a log file, never a password) and the `tenantflow-dev` command
reports it in one line with exit code 2.
"""

from __future__ import annotations

from tenantflow.errors import TenantflowError

__all__ = ["StackError"]


class StackError(TenantflowError, RuntimeError):
    """The local stack could not be brought to the asked state."""
