"""The tripwire: every Prefect function that loads code a deployment names through the API
refuses, wherever a module holds it, also in modules imported afterwards.

In a Python process of its own (the tripwire changes Prefect's modules for good), as the
worker and a flow-run process have it. No stack needed.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: Run in a fresh interpreter: import what the worker imports, install, then look.
SCRIPT = """
import json, os, sys
import prefect.flow_engine, prefect.runner.runner, prefect.workers.process
from tenantflow.tripwire import TRIPPED, ForbiddenCodePath, install_tripwire
from tenantflow.tripwire import refuse_code_from_the_api

install_tripwire()
install_tripwire()  # idempotent
import prefect.cli.deploy._core  # imported after: takes the replacement with it

holders = sorted(
    f"{name}.{attribute}"
    for name, module in list(sys.modules.items())
    if name.startswith("prefect") and module is not None
    for attribute, value in vars(module).items()
    if value is refuse_code_from_the_api
)
refused = []
os.environ.pop("PREFECT__FLOW_ENTRYPOINT", None)
calls = {
    "prefect.flow_engine.load_flow": lambda: prefect.flow_engine.load_flow(object()),
    "prefect.workers.process.load_flow_from_flow_run": (
        lambda: prefect.workers.process.load_flow_from_flow_run(object())
    ),
    "prefect.cli.deploy._core.run_steps": lambda: prefect.cli.deploy._core.run_steps([]),
}
for name, call in calls.items():
    try:
        call()
    except ForbiddenCodePath as error:
        refused.append([name, str(error)])
print(json.dumps({"holders": holders, "refused": refused, "tripped": [list(t) for t in TRIPPED]}))
"""


def test_every_holder_of_a_loader_of_api_code_refuses() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    holders = set(found["holders"])
    # The functions themselves, where Prefect defines them.
    assert {f"{module}.{name}" for module, name in found["tripped"]} <= holders
    # And every module that had imported one before the tripwire was installed, or after.
    assert {
        "prefect.flow_engine.load_flow_from_flow_run",
        "prefect.workers.process.load_flow_from_flow_run",
        "prefect.runner.runner.load_flow_from_flow_run",
        "prefect.runner._workspace_resolver.run_steps",
        "prefect.deployments.steps.run_step",
        "prefect.cli.deploy._core.run_steps",
    } <= holders
    refused = dict(found["refused"])
    assert set(refused) == {
        "prefect.flow_engine.load_flow",
        "prefect.workers.process.load_flow_from_flow_run",
        "prefect.cli.deploy._core.run_steps",
    }
    for message in refused.values():
        assert "tenantflow runs only the entrypoints its own prefect.yaml declares" in message
    # Loud: the refusal is logged as well as raised.
    assert "refused: Prefect tried to load a flow or run steps" in done.stderr + done.stdout
