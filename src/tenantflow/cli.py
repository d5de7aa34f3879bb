"""The `tenantflow` command: the local stack, migrations, more commands as they land."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

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


def _migrate_entrypoint() -> Path:
    """`flows/migrate.py` of the project folder (or of the source checkout)."""
    project = Path(os.environ.get("TENANTFLOW_PROJECT_DIR") or Path.cwd())
    checkout = Path(__file__).resolve().parents[2]
    for folder in (project, checkout):
        if (folder / "flows" / "migrate.py").is_file():
            return folder / "flows" / "migrate.py"
    raise StackError("flows/migrate.py not found: run `tenantflow migrate` from the project folder")


def _migrate(args: argparse.Namespace) -> int:
    """Run the `migrate` flow itself, so the run shows in the Prefect UI like any other."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # NOTE: imported here so `tenantflow stack ...` stays free of Prefect and Alembic.
    from prefect.flows import load_flow_from_entrypoint

    from tenantflow.migrate import MigrationError, MigrationResult
    from tenantflow.settings import SettingsError

    flow: Callable[..., Coroutine[Any, Any, MigrationResult]] = load_flow_from_entrypoint(
        f"{_migrate_entrypoint()}:migrate", use_placeholder_flow=False
    )
    try:
        result = asyncio.run(
            flow(revision=args.revision, dry_run=args.dry_run, downgrade_to=args.downgrade_to)
        )
    except (MigrationError, SettingsError) as error:
        log.error("migration failed: %s", error)
        return 1
    if result.dry_run and result.sql:
        log.info("%s", result.sql)
    log.info("%s", result.summary())
    return 0


def _token(args: argparse.Namespace) -> int:
    """Mint a stack access token for a user of `auth.users`; stdout gets the token only."""
    from tenantflow.localstack.auth_server import UnknownUser, mint_access_token

    try:
        token = asyncio.run(
            mint_access_token(
                Stack().config, args.email, operator=args.operator, expires_in=args.expires_in
            )
        )
    except UnknownUser as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    sys.stdout.write(token + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="tenantflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stack = commands.add_parser("stack", help="the local stack")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(handler=_stack)
    migrate = commands.add_parser(
        "migrate",
        help="run the `migrate` flow: upgrade (or --dry-run) through the session pooler",
    )
    migrate.add_argument("--revision", default="head", help="revision to upgrade to (head)")
    migrate.add_argument("--dry-run", action="store_true", help="print the SQL, change nothing")
    migrate.add_argument(
        "--downgrade-to", metavar="REVISION", help="downgrade to this revision id, or base"
    )
    migrate.set_defaults(handler=_migrate)
    token = commands.add_parser(
        "token", help="print an access token of the local stack's Auth stand-in for a user"
    )
    token.add_argument("--email", required=True, help="a user of auth.users")
    token.add_argument(
        "--operator", action="store_true", help="put the tenantflow_operator grant in the token"
    )
    token.add_argument(
        "--expires-in", type=int, default=3600, metavar="S", help="lifetime in seconds (3600)"
    )
    token.set_defaults(handler=_token)
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except StackError as error:
        log.error("error: %s", error)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
