"""Everything tenantflow raises on purpose shares one root, `TenantflowError`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import tenantflow
from tenantflow.errors import TenantflowError


def _product_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(tenantflow.__path__, "tenantflow."):
        # Alembic revision files run only inside Alembic's environment.
        if ".migrations." in info.name:
            continue
        names.append(info.name)
    return names


def test_every_tenantflow_exception_derives_from_the_one_root() -> None:
    strays = []
    seen = 0
    for name in _product_modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ != name or not issubclass(obj, BaseException):
                continue
            seen += 1
            if not issubclass(obj, TenantflowError):
                strays.append(f"{name}.{obj.__qualname__}")
    assert seen >= 20, "the walk found too few exception classes to be looking in the right place"
    assert strays == []
