"""What a flow-run process pays to import its flow, beyond importing Prefect.

Every flow run starts a fresh process that imports Prefect and then the flow's module
(`python -m prefect.engine` loads the deployment's entrypoint), so each import below is
paid once per run. Each figure is the median of `ROUNDS` fresh interpreters; the baseline
is `import prefect` measured in the same interpreters, so the ratio compares the flow's
own cost with Prefect's on whatever machine runs it.

    .venv/bin/python -m bench.imports            # the table, and the largest modules
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.table import Row, ratio, say

ROUNDS = int(os.environ.get("BENCH_IMPORT_ROUNDS", "7"))
ENTRYPOINTS = (
    "flows.noop",
    "flows.client_report",
    "flows.nightly_rollup",
    "flows.nightly_rollup_shard",
    "flows.migrate",
)
PROJECT = Path(__file__).resolve().parent.parent

_PROBE = """
import importlib, json, sys, time
started = time.perf_counter()
import prefect
prefect_s = time.perf_counter() - started
started = time.perf_counter()
importlib.import_module(sys.argv[1])
print(json.dumps({"prefect": prefect_s, "flow": time.perf_counter() - started}))
"""


def _once(module: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures = json.loads(out)
    return figures["prefect"], figures["flow"]


def heaviest(module: str, top: int = 8) -> list[tuple[str, float]]:
    """The modules `module` pulls in beyond Prefect, by cumulative import time (s)."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import prefect; import {module}"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stderr.splitlines()
    # NOTE: everything after Prefect's own top-level line is the flow's share.
    start = max(i for i, line in enumerate(err) if line.endswith("| prefect"))
    rows = []
    for line in err[start + 1 :]:
        _, cumulative, name = (part.strip() for part in line.split("|"))
        if name.startswith(("tenantflow", "flows", "sqlalchemy", "alembic", "joserfc", "jwt")):
            rows.append((name, int(cumulative) / 1e6))
    rows.sort(key=lambda row: -row[1])
    return rows[:top]


def import_rows() -> list[Row]:
    say(f"\n## Importing each flow beyond Prefect (median of {ROUNDS} fresh processes)")
    rows = []
    for module in ENTRYPOINTS:
        samples = [_once(module) for _ in range(ROUNDS)]
        prefect_s = statistics.median(s[0] for s in samples)
        flow_s = statistics.median(s[1] for s in samples)
        say(
            f"{module:28s} {flow_s * 1000:6.0f} ms beyond `import prefect` "
            f"({prefect_s * 1000:.0f} ms)  {ratio(flow_s, prefect_s)}"
        )
        rows.append(
            Row(
                f"import {module}, beyond Prefect",
                f"{flow_s * 1000:.0f} ms",
                f"import prefect {prefect_s * 1000:.0f} ms",
                ratio(flow_s, prefect_s),
            )
        )
    return rows


def main() -> None:
    import_rows()
    for module in ENTRYPOINTS[1:3]:
        say(f"\nheaviest imports of {module} (cumulative s, one run):")
        for name, seconds in heaviest(module):
            say(f"  {seconds:6.3f}  {name}")


if __name__ == "__main__":
    main()
