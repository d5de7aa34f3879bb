"""The root of everything tenantflow raises on purpose.

Every error below `TenantflowError` carries a message that is safe to show an operator: it
names what was refused and why, never a token, key or password. Catch `TenantflowError` to
tell "tenantflow refused or could not do this" from a bug; the subclasses live next to the
code that raises them (`auth`, `sealing`, `tenancy`, `migrate`, ...).
"""

from __future__ import annotations

__all__ = ["TenantflowError"]


class TenantflowError(Exception):
    """Base of all tenantflow errors. The message is safe to log and show."""
