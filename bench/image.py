"""The worker image: its build cold and cached, and a worker container's start against the
stack's own process worker's, both timed to the same point (the worker registered with
its pool, its first heartbeat in).

The cold build uses a throwaway podman storage (`Podman.from_env(cache=...)`): the
debootstrapped base, the python layer and the Dockerfile's steps all run, as on a fresh
machine. The cached build is `make image` with nothing changed.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.stackapi import on_stack
from bench.table import Row, machine, ratio, render, say, update
from tenantflow_dev import Stack
from tenantflow_dev.image import build_image
from tenantflow_dev.podman import Podman
from tenantflow_dev.worker import LocalWorker
from tenantflow_dev.worker_container import WorkerContainer

#: Starts timed of each kind; the median is reported.
STARTS = 3


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def build_rows(project: Path) -> list[Row]:
    say("\n## the worker image: built cold (a throwaway podman storage) and cached")
    with tempfile.TemporaryDirectory(prefix="tenantflow-bench-image-", dir="/var/tmp") as cache:
        cold = build_image(project, podman=Podman.from_env(cache=Path(cache)))
        # NOTE: the throwaway storage's files belong to podman's user namespace.
        Podman.from_env(cache=Path(cache)).run("system", "reset", "--force", check=False)
    build_image(project)
    cached = build_image(project)
    say(
        f"  cold {cold.seconds:.1f}s (built {', '.join(cold.built)}; "
        f"{cold.size_bytes / 1e6:.0f} MB); cached {cached.seconds:.2f}s"
    )
    return [
        Row(
            "worker image build, cached (s)",
            f"{cached.seconds:.2f}",
            f"{cold.seconds:.1f} (cold: base, python layer, Dockerfile)",
            ratio(cached.seconds, cold.seconds),
            "everything cached",
            not cached.built,
        )
    ]


def start_rows(stack: Stack) -> list[Row]:
    say(
        "\n## worker start to registered with its pool: a container against the process "
        f"worker ({STARTS} each)"
    )
    podman = Podman.for_stack(stack.config)
    local = LocalWorker(stack.config)
    container_s: list[float] = []
    local_s: list[float] = []
    local.stop()
    try:
        with tempfile.TemporaryDirectory(prefix="tenantflow-bench-") as folder:
            for n in range(STARTS):
                container = WorkerContainer(
                    stack.config, podman, name=f"tenantflow-bench-start-{n}", folder=Path(folder)
                )
                started = time.monotonic()
                container.start()
                container_s.append(time.monotonic() - started)
                container.remove()
        for _ in range(STARTS):
            started = time.monotonic()
            local.start()
            local_s.append(time.monotonic() - started)
            local.stop()
    finally:
        local.start()
    contained, alone = _median(container_s), _median(local_s)
    say(f"  container {contained:.1f}s, process worker {alone:.1f}s (medians)")
    return [
        Row(
            "worker container start to registered (s, median)",
            f"{contained:.1f}",
            f"{alone:.1f} (the stack's process worker)",
            ratio(contained, alone),
        )
    ]


async def image_rows(stack: Stack) -> list[Row]:
    # NOTE: in threads: the stack's worker bootstraps Prefect with a loop of its own.
    rows = await asyncio.to_thread(build_rows, stack.config.project_dir)
    return rows + await asyncio.to_thread(start_rows, stack)


def main() -> None:
    """`python -m bench.image`: these measures alone, into `bench/results.md`."""
    rows = on_stack(image_rows)
    say("\n" + render(rows))
    update(rows, f"the worker image's rows measured alone ({machine()})")


if __name__ == "__main__":
    main()
