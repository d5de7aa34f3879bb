"""The product stands on its own floor: nothing in `src/tenantflow` imports the dev stack.

The local dev stack is the `tenantflow-devstack` distribution (`tenantflow_dev`), installed
in the dev environment only; the worker image has the product alone. A product module that
imported it (or the stack's old home inside the product, `tenantflow.localstack`) would
fail there, so every module is read, not imported: an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PRODUCT = Path(__file__).resolve().parents[2] / "src" / "tenantflow"
FORBIDDEN = ("tenantflow_dev", "tenantflow.localstack")


def _imported_modules(tree: ast.AST) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(node.args[0].value)
    return found


def _forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(f"{bad}.") for bad in FORBIDDEN)


def test_no_product_module_imports_the_dev_stack() -> None:
    modules = sorted(PRODUCT.rglob("*.py"))
    assert len(modules) >= 15, "the scan found too few modules to be looking at the product"
    offenders = [
        f"{path.relative_to(PRODUCT.parent)}: {name}"
        for path in modules
        for name in _imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if _forbidden(name)
    ]
    assert offenders == []


def test_the_dev_stack_has_left_the_product_package() -> None:
    # NOTE: sources only: a checkout may keep a stale __pycache__ of the old folder.
    assert list((PRODUCT / "localstack").rglob("*.py")) == []


def test_the_scan_sees_the_imports_it_forbids() -> None:
    source = (
        "import tenantflow_dev\n"
        "from tenantflow_dev.stack import Stack\n"
        "def f():\n"
        "    from tenantflow import localstack\n"
        "    import importlib\n"
        "    importlib.import_module('tenantflow_dev.cli')\n"
    )
    found = [name for name in _imported_modules(ast.parse(source)) if _forbidden(name)]
    assert found == [
        "tenantflow_dev",
        "tenantflow_dev.stack",
        "tenantflow_dev.stack.Stack",
        "tenantflow.localstack",
        "tenantflow_dev.cli",
    ]
