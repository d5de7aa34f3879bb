"""Concurrent units of work whose every answer is checked against its own parameters.

Used in-process and as `python -m tests.db.load` so several OS processes can share
one pooler at once. Prints one JSON report line when run as a program.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tenantflow.db import build_transaction_engine, session_scope
from tenantflow.settings import load_settings

QUERIES = 5


@dataclass
class LoadReport:
    units: int = 0
    queries_ok: int = 0
    wrong: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def merge(self, other: LoadReport) -> None:
        self.units += other.units
        self.queries_ok += other.queries_ok
        self.wrong += other.wrong
        self.errors.update(other.errors)

    def to_json(self) -> str:
        return json.dumps(
            {
                "units": self.units,
                "queries_ok": self.queries_ok,
                "wrong": self.wrong,
                "errors": dict(self.errors),
            }
        )

    @classmethod
    def from_json(cls, line: str) -> LoadReport:
        data = json.loads(line)
        return cls(data["units"], data["queries_ok"], data["wrong"], Counter(data["errors"]))

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def _checks(unit: int, rng: random.Random) -> list[tuple[str, dict[str, Any], Any]]:
    a, b, n = rng.randint(1, 10**9), rng.randint(0, 999), rng.randint(1, 50)
    s = f"unit-{unit}-{rng.random()}"
    x, y = Decimal(rng.randint(0, 10**6)) / 100, Decimal(rng.randint(0, 10**6)) / 100
    return [
        ("SELECT CAST(:a AS bigint) * 1000 + CAST(:b AS int)", {"a": a, "b": b}, (a * 1000 + b,)),
        ("SELECT CAST(:s AS text) || ':' || CAST(:a AS bigint)", {"s": s, "a": a}, (f"{s}:{a}",)),
        ("SELECT count(*) FROM generate_series(1, CAST(:n AS int))", {"n": n}, (n,)),
        ("SELECT md5(CAST(:s AS text))", {"s": s}, (hashlib.md5(s.encode()).hexdigest(),)),  # noqa: S324
        (
            "SELECT CAST(:x AS numeric) + CAST(:y AS numeric), CAST(:s AS text)",
            {"x": x, "y": y, "s": s},
            (x + y, s),
        ),
    ]


async def _unit(engine: AsyncEngine, unit: int, report: LoadReport) -> None:
    rng = random.Random(unit * 7919 + id(report))
    try:
        async with session_scope(engine) as session:
            for sql, params, expected in _checks(unit, rng):
                row = (await session.execute(text(sql), params)).one()
                if tuple(row) == expected:
                    report.queries_ok += 1
                else:
                    report.wrong += 1
    except Exception as error:
        report.errors[type(error).__name__] += 1
    report.units += 1


async def run_load(engine: AsyncEngine, units: int, concurrency: int | None = None) -> LoadReport:
    """Run `units` concurrent units of work (5 checked queries each) on `engine`."""
    report = LoadReport()
    limit = asyncio.Semaphore(concurrency or units)

    async def bounded(unit: int) -> None:
        async with limit:
            await _unit(engine, unit, report)

    await asyncio.gather(*(bounded(unit) for unit in range(units)))
    return report


def seed_engine(url: str) -> AsyncEngine:
    """The seed document's engine, verbatim: asyncpg's defaults (statement cache on)."""
    return create_async_engine(
        url, pool_size=5, max_overflow=10, pool_pre_ping=True, pool_recycle=300
    )


async def _main(args: argparse.Namespace) -> LoadReport:
    settings = load_settings(db_pool_mode=args.pool_mode)
    if args.engine == "seed":
        engine = seed_engine(settings.database_url.get_secret_value())
    else:
        engine = build_transaction_engine(settings)
    try:
        return await run_load(engine, args.units)
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["project", "seed"], default="project")
    parser.add_argument("--pool-mode", choices=["queue", "null"], default="queue")
    parser.add_argument("--units", type=int, default=200)
    report = asyncio.run(_main(parser.parse_args()))
    sys.stdout.write(report.to_json() + "\n")


if __name__ == "__main__":
    main()
