"""Sweep throughput with two worker containers of the image on the pool, against the
stack's one process worker, on the same machine, for the same sweep in shards."""

from __future__ import annotations

import asyncio
import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.shards import _sweep
from bench.stackapi import on_stack
from bench.sweep import _forget_day, create_clients, remove_clients
from bench.table import Row, machine, ratio, render, say, update
from tenantflow_dev import Stack
from tenantflow_dev.worker_container import worker_containers

CONTAINER_CLIENTS = int(os.environ.get("BENCH_CONTAINER_CLIENTS", "4000"))
CONTAINER_SHARD_SIZE = int(os.environ.get("BENCH_CONTAINER_SHARD_SIZE", "1000"))


async def container_rows(stack: Stack) -> list[Row]:
    day = (datetime.now(UTC) - timedelta(days=62)).date()
    say(
        f"\n## a sweep of {CONTAINER_CLIENTS:,} clients in shards of {CONTAINER_SHARD_SIZE:,}: "
        "2 worker containers (2 runs each) against the stack's process worker"
    )
    await create_clients(stack.config, CONTAINER_CLIENTS, day)
    try:
        await _forget_day(stack.config, day)
        alone, _, _ = await _sweep(stack, day, CONTAINER_SHARD_SIZE)
        await _forget_day(stack.config, day)
        with tempfile.TemporaryDirectory(prefix="tenantflow-bench-") as folder:
            # NOTE: entered and left in a thread: the stack's worker, stopped and started
            # again around the containers, bootstraps Prefect with a loop of its own.
            serving = worker_containers(
                stack.config, Path(folder), count=2, limit=2, prefix="tenantflow-bench-worker"
            )
            containers = await asyncio.to_thread(serving.__enter__)
            try:
                contained, _, children = await _sweep(stack, day, CONTAINER_SHARD_SIZE)
            finally:
                await asyncio.to_thread(serving.__exit__, None, None, None)
    finally:
        removed = await remove_clients(stack.config)
        say(f"  removed the {removed} benchmark clients")
    names = {c.worker_name for c in containers}
    used = {child.labels.get("prefect.worker.name") for child in children} & names
    clients = CONTAINER_CLIENTS
    say(
        f"  1 process worker {alone:.1f}s ({clients / alone:.0f} clients/s); 2 worker "
        f"containers {contained:.1f}s ({clients / contained:.0f} clients/s), "
        f"{len(children)} shards on {len(used)} containers"
    )
    return [
        Row(
            f"sweep of {clients:,} clients in shards, 2 worker containers (clients/s)",
            f"{clients / contained:.0f} ({len(children)} shards on {len(used)} containers)",
            f"{clients / alone:.0f} (1 process worker)",
            ratio(alone, contained),
            "shards on both containers",
            len(used) == 2,
        )
    ]


def main() -> None:
    """`python -m bench.containers`: this measure alone, into `bench/results.md`."""
    rows = on_stack(container_rows)
    say("\n" + render(rows))
    update(rows, f"the worker containers' row measured alone ({machine()})")


if __name__ == "__main__":
    main()
