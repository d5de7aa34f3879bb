"""Everything tenantflow raises on purpose shares one root, `TenantflowError`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import tenantflow
import tenantflow_dev
from tenantflow.errors import TenantflowError


def _product_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(tenantflow.__path__, "tenantflow."):
        # Alembic revision files run only inside Alembic's environment.
        if ".migrations." in info.name:
            continue
        names.append(info.name)
    return names


def _dev_modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages(tenantflow_dev.__path__, "tenantflow_dev.")]


def _strays(modules: list[str]) -> tuple[list[str], int]:
    """Exception classes defined in `modules` outside `TenantflowError`, and how many were seen."""
    strays = []
    seen = 0
    for name in modules:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ != name or not issubclass(obj, BaseException):
                continue
            seen += 1
            if not issubclass(obj, TenantflowError):
                strays.append(f"{name}.{obj.__qualname__}")
    return strays, seen


def test_every_tenantflow_exception_derives_from_the_one_root() -> None:
    strays, seen = _strays(_product_modules())
    assert seen >= 20, "the walk found too few exception classes to be looking in the right place"
    assert strays == []


def test_every_dev_stack_exception_derives_from_the_one_root() -> None:
    strays, seen = _strays(_dev_modules())
    assert seen >= 3, "the walk found too few exception classes in the dev stack"
    assert strays == []
