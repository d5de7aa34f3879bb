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


def _addresses(stack: Stack) -> str:
    config = stack.config
    return (
        f"Prefect UI:            {config.prefect_ui_url}\n"
        # NOTE: a local dev stack: the UI's login form wants the whole `user:password`
        # string (also PREFECT_API_AUTH_STRING in .env); database passwords stay unprinted.
        f"  sign in with:        {config.secrets.prefect_auth_string}"
        "  (paste it whole into the login box)\n"
        f"Transaction pooler:    {config.host}:{config.transaction_pooler_port}"
        "  (DATABASE_URL, workers)\n"
        f"Session pooler:        {config.host}:{config.session_pooler_port}"
        "  (MIGRATION_DATABASE_URL, migrations)\n"
        f"PostgreSQL (direct):   {config.host}:{config.pg_port}\n"
        f"Supabase Auth stand-in: {config.supabase_url}\n"
        f"Settings written to    {config.env_file}"
    )


def _demo(stack: Stack) -> bool:
    log.info("\nmain job: nightly-rollup through the deployment and the worker ...")
    demo = stack.demo_run()
    ui = stack.config.prefect_ui_url
    log.info(
        "nightly-rollup run %s: %s in %.1fs%s\n  %s\n"
        "\nDeployments (%s/deployments):\n"
        "  nightly-rollup/nightly-rollup   02:15 UTC daily; by hand: paste the operator token\n"
        "  client-report/client-report     client_id, period, and a member's token\n"
        "  migrate/migrate                 schema upgrades / dry runs\n"
        "\nFor a client-report run form (tokens are valid 8 hours; "
        "`tenantflow token --email E` makes more):\n"
        "  client_id:      %s   (%s, where %s is owner)\n"
        "  member token:   %s\n"
        "  operator token: %s",
        demo.flow_run_id,
        demo.state,
        demo.seconds,
        f" ({demo.message})" if demo.message and demo.state != "Completed" else "",
        demo.ui_url,
        ui,
        demo.member_client.id,
        demo.member_client.name,
        demo.member_email,
        demo.member_token,
        demo.operator_token,
    )
    return demo.state == "Completed"


def _stack(args: argparse.Namespace) -> int:
    stack = Stack()
    started = time.monotonic()
    if args.action == "up":
        rows = stack.up(services_only=args.services_only)
        log.info("\n%s\n\n%s", _table(rows), _addresses(stack))
        healthy = all(row.healthy for row in rows)
        if healthy and not args.services_only and not args.no_demo_run:
            healthy = _demo(stack)
        log.info("\nstack up in %.1fs", time.monotonic() - started)
        return 0 if healthy else 1
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


def _project_dir() -> Path:
    """The folder with `prefect.yaml`: TENANTFLOW_PROJECT_DIR, the cwd, or the checkout."""
    checkout = Path(__file__).resolve().parents[2]
    for folder in (Path(os.environ.get("TENANTFLOW_PROJECT_DIR") or Path.cwd()), checkout):
        if (folder / "prefect.yaml").is_file():
            return folder.resolve()
    raise StackError("prefect.yaml not found: run `tenantflow deploy` from the project folder")


def _deploy(args: argparse.Namespace) -> int:
    """Bootstrap the Prefect installation, then `prefect --no-prompt deploy` everything."""
    from dotenv import dotenv_values

    from tenantflow.deployments import WORK_POOLS, BootstrapError, DeployError, bootstrap, deploy
    from tenantflow.settings import SettingsError, load_settings

    if args.image and args.pool_type == "process":
        log.error("--image is for docker and kubernetes pools; process workers run in place")
        return 2
    project = _project_dir()
    # NOTE: like pydantic-settings and Prefect, the environment wins over the project's .env.
    dotenv = {k: v for k, v in dotenv_values(project / ".env").items() if v is not None}
    env = {key: value for key, value in dotenv.items() if key not in os.environ}
    api_url = os.environ.get("PREFECT_API_URL") or dotenv.get("PREFECT_API_URL")
    auth_string = os.environ.get("PREFECT_API_AUTH_STRING") or dotenv.get("PREFECT_API_AUTH_STRING")
    if not api_url:
        log.error("PREFECT_API_URL is not set (nor in %s): run `make up` or export it", project)
        return 2
    try:
        settings = load_settings(_env_file=project / ".env")
        result = bootstrap(
            concurrency_limit=settings.db_concurrency_limit,
            concurrency_slots=settings.db_concurrency_slots,
            flow_slots=settings.db_flow_slots,
            project_dir=project,
            pool_types=[args.pool_type],
            api_url=api_url,
            # NOTE: baked into the pool's template, never a job variable: a flow run cannot
            # choose another image.
            image=args.image,
            auth_string=auth_string,
        )
        log.info("bootstrap: %s", result.summary())
        if args.bootstrap_only:
            return 0
        pool = None if args.pool_type == "process" else WORK_POOLS[args.pool_type]
        deployed = deploy(
            project_dir=project,
            env={**env, "PREFECT_API_URL": api_url},
            pool=pool,
        )
    except (SettingsError, BootstrapError, DeployError) as error:
        log.error("deploy failed: %s", error)
        return 1
    log.info(
        "deployed %s onto work pool %s in %.1fs",
        ", ".join(deployed.deployments),
        deployed.work_pool,
        deployed.seconds,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    """Serve a process work pool with the tenantflow worker until SIGTERM or SIGINT."""
    from tenantflow.worker import run_worker

    return run_worker(args.pool, name=args.name, limit=args.limit)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="tenantflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stack = commands.add_parser("stack", help="the local stack")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument(
        "--services-only",
        action="store_true",
        help="up: start the services only (no migrations, demo data, deployments, demo run)",
    )
    stack.add_argument(
        "--no-demo-run", action="store_true", help="up: skip the demo nightly-rollup run"
    )
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
    deploy = commands.add_parser(
        "deploy",
        help="bootstrap work pools and the tenantflow-db limit, then deploy prefect.yaml",
    )
    deploy.add_argument(
        "--pool-type",
        choices=["process", "docker", "kubernetes"],
        default="process",
        help="deploy onto tenantflow-<type> (default process, the local worker's pool)",
    )
    deploy.add_argument(
        "--image",
        help="image of the flow runs on a docker or kubernetes pool (baked into the pool's "
        "base job template; default tenantflow-worker:latest)",
    )
    deploy.add_argument(
        "--bootstrap-only", action="store_true", help="create/update pools and limit only"
    )
    deploy.set_defaults(handler=_deploy)
    worker = commands.add_parser(
        "worker",
        help="serve a process work pool; job variables cannot change what a flow run runs",
    )
    worker.add_argument("--pool", required=True, help="the process work pool (it must exist)")
    worker.add_argument("--name", help="the worker's name (default: Prefect's generated one)")
    worker.add_argument(
        "--limit", type=int, metavar="N", help="at most N flow runs at once (no limit)"
    )
    worker.set_defaults(handler=_worker)
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except StackError as error:
        log.error("error: %s", error)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
