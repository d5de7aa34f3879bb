"""The `tenantflow` command: the local stack today, more commands as they land."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from tenantflow.localstack import Stack, StackError
from tenantflow.localstack.services import Health

__all__ = ["main"]

log = logging.getLogger("tenantflow")


def _table(rows: list[Health]) -> str:
    lines = [f"{'part':<22}{'address':<26}{'pid':<9}health"]
    for row in rows:
        health = "ok" if row.healthy else "DOWN"
        detail = f" ({row.detail})" if row.detail else ""
        lines.append(f"{row.name:<22}{row.address:<26}{row.pid or '-'!s:<9}{health}{detail}")
    return "\n".join(lines)


def _stack(args: argparse.Namespace) -> int:
    stack = Stack()
    started = time.monotonic()
    if args.action == "up":
        rows = stack.up()
        log.info("\n%s", _table(rows))
        config = stack.config
        log.info(
            "\nPrefect UI:            %s\n"
            "Transaction pooler:    %s:%d  (DATABASE_URL, workers)\n"
            "Session pooler:        %s:%d  (MIGRATION_DATABASE_URL, migrations)\n"
            "PostgreSQL (direct):   %s:%d\n"
            "Settings written to    %s\n"
            "stack up in %.1fs",
            config.prefect_ui_url,
            config.host,
            config.transaction_pooler_port,
            config.host,
            config.session_pooler_port,
            config.host,
            config.pg_port,
            config.env_file,
            time.monotonic() - started,
        )
        return 0 if all(row.healthy for row in rows) else 1
    if args.action == "down":
        stack.down()
        log.info("stack down in %.1fs", time.monotonic() - started)
        return 0
    rows = stack.status()
    log.info("%s", _table(rows))
    return 0 if all(row.healthy for row in rows) else 3


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="tenantflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stack = commands.add_parser("stack", help="the local stack")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(handler=_stack)
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except StackError as error:
        log.error("error: %s", error)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
