"""The `tenantflow-dev` command: the local dev stack (up, down, status, restart), its tokens,
its sign-ins (mailbox) and the worker image (image).

Failures end in one line on stderr, as with `tenantflow` (the product's `report_failure`
reports both): a refusal (`StackError`, `CommandError`) exits 2, `--debug` adds the
traceback. Nothing here prints a secret unasked but what a developer signs in with on this
local stack: the Prefect UI's login string, and the demo users' passwords (`make up`).
`status --secrets` adds the stack's API keys (the service-role key among them), and
`mailbox` the one-time codes the Auth stand-in "emailed".
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from uuid import UUID

from tenantflow.cli import CommandError, parameter_argument, parameters_of, report_failure
from tenantflow_dev.config import StackConfig
from tenantflow_dev.demo import DEMO_OPERATOR
from tenantflow_dev.errors import StackError
from tenantflow_dev.health import Health
from tenantflow_dev.stack import Stack

__all__ = ["main", "sign_ins"]

log = logging.getLogger("tenantflow_dev")


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
        f"Prefect UI:            {config.prefect_ui_url}{_topology(config)}\n"
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


def _topology(config: StackConfig) -> str:
    if config.prefect_topology == "single":
        return "  (one Prefect server)"
    replicas = len(config.prefect_replica_ports)
    return (
        f"  (HAProxy in front of {replicas} API replicas; services process; "
        f"Redis {config.host}:{config.redis_port})"
    )


def _demo(stack: Stack) -> bool:
    log.info("\nmain job: nightly-rollup through the deployment and the worker ...")
    demo = stack.demo_run()
    ui = stack.config.prefect_ui_url
    log.info(
        "nightly-rollup run %s: %s in %.1fs%s\n  %s\n"
        "\nDeployments (%s/deployments):\n"
        "  nightly-rollup/nightly-rollup   02:15 UTC daily; by hand: an operator's sealed token\n"
        "  client-report/client-report     client_id, period, and a member's sealed token\n"
        "  nightly-rollup-shard/...        started by nightly-rollup only (its shards)\n"
        "  migrate/migrate                 schema upgrades / dry runs (operators)\n"
        "  noop/noop                       does nothing: the worker's floor (make bench)\n"
        "\nSealed access tokens to paste into the run forms (each is good for one run with "
        "exactly these\nparameters within an hour; `tenantflow-dev token --email E --flow F "
        "[--client ID] [--param NAME=VALUE]`\nseals more):\n"
        "  client-report, client_id:  %s   (%s, where %s is owner)\n"
        "  client-report, period_start: %s, period_end: %s\n"
        "  client-report, access_token:  %s\n"
        "  nightly-rollup (operator, every client), access_token:  %s\n"
        "\n%s",
        demo.flow_run_id,
        demo.state,
        demo.seconds,
        f" ({demo.message})" if demo.message and demo.state != "Completed" else "",
        demo.ui_url,
        ui,
        demo.member_client.id,
        demo.member_client.name,
        demo.member_email,
        demo.report_period[0],
        demo.report_period[1],
        demo.member_token,
        demo.operator_token,
        sign_ins(stack.config, demo.member_email),
    )
    return demo.state == "Completed"


def sign_ins(config: StackConfig, member_email: str) -> str:
    """What `make up` prints for signing in to the Auth stand-in: the demo operator's and a
    member's email, then `password: ...`, one line each (local demo passwords only)."""
    return (
        "Sign-ins of the Supabase Auth stand-in (password, or a one-time code: "
        "`tenantflow-dev mailbox --email E`):\n"
        f"  operator: {DEMO_OPERATOR}  password: {config.secrets.demo_password(DEMO_OPERATOR)}\n"
        f"  member:   {member_email}  password: {config.secrets.demo_password(member_email)}"
    )


def _up(args: argparse.Namespace) -> int:
    config = StackConfig.from_env()
    if args.topology:
        config = dataclasses.replace(config, prefect_topology=args.topology)
    stack = Stack(config)
    started = time.monotonic()
    setup = False if args.services_only else (True if args.main_job else None)
    rows = stack.up(setup=setup)
    log.info("\n%s\n\n%s", _table(rows), _addresses(stack))
    healthy = all(row.healthy for row in rows)
    if healthy and args.main_job and not args.no_demo_run:
        healthy = _demo(stack)
    log.info(
        "\nstarted: %s; one-shot steps (migrate, demo data, deploy): %s",
        ", ".join(stack.started) or "nothing (every part was up)",
        "ran" if stack.ran_setup else "skipped (`--main-job` runs them)",
    )
    log.info("the stack is up after %.1fs", time.monotonic() - started)
    return 0 if healthy else 1


def _restart(args: argparse.Namespace) -> int:
    stack = Stack()
    started = time.monotonic()
    if not args.part:
        names = ", ".join(service.name for service in stack.services())
        raise StackError(f"which part? `tenantflow-dev restart PART`, PART one of {names}")
    row = stack.restart(args.part)
    log.info("%s", _table([row]))
    log.info("restarted %s in %.1fs", row.name, time.monotonic() - started)
    return 0 if row.healthy else 1


def _down(args: argparse.Namespace) -> int:
    stack = Stack()
    started = time.monotonic()
    stack.down()
    log.info("the stack is down after %.1fs", time.monotonic() - started)
    return 0


def _status(args: argparse.Namespace) -> int:
    stack = Stack()
    rows = stack.status()
    log.info("%s", _table(rows))
    if args.secrets:
        secrets = stack.config.secrets
        # NOTE: the service-role key bypasses RLS and is the Auth admin API's key: shown only
        # here, never written to `.env` nor given to a worker.
        log.info(
            "\nSUPABASE_URL=%s\nSUPABASE_ANON_KEY=%s\nSUPABASE_SERVICE_ROLE_KEY=%s",
            stack.config.supabase_url,
            secrets.anon_key,
            secrets.service_role_key,
        )
    return 0 if all(row.healthy for row in rows) else 3


def _image(args: argparse.Namespace) -> int:
    """Build the worker image with podman from the unchanged Dockerfile (`make image`)."""
    from tenantflow_dev.image import build_image

    built = build_image(StackConfig.from_env().project_dir, verbose=True)
    log.info(
        "%s (%s, %s): %.0f MB, %s in %.1fs",
        built.reference,
        built.content_tag,
        built.image_id[:12],
        built.size_bytes / 1e6,
        f"built {', '.join(built.built)}" if built.built else "everything cached",
        built.seconds,
    )
    return 0


def _mailbox(args: argparse.Namespace) -> int:
    """The latest one-time code sent to a user (or to each user), as the stand-in "mailed" it.

    stdout gets, one line a user: the email, the code and when it expires (`--email E
    --code-only`: the code alone, to pipe).
    """
    from tenantflow_dev.auth_stand_in import latest_one_time_code, mailbox_folder, read_mailbox

    config = Stack().config
    if args.email:
        emails = [args.email.strip().lower()]
    else:
        folder = mailbox_folder(config)
        emails = sorted(path.name for path in folder.iterdir()) if folder.exists() else []
    if args.code_only:
        if not args.email:
            raise CommandError("--code-only needs --email")
        code = latest_one_time_code(config, args.email)
        if code is None:
            sys.stderr.write(f"no one-time code was sent to {args.email}\n")
            return 1
        sys.stdout.write(code + "\n")
        return 0
    found = False
    for email in emails:
        mails = read_mailbox(config, email)
        if mails:
            found = True
            latest = mails[-1]
            sys.stdout.write(
                f"{latest.email}  code: {latest.code}  "
                f"(sent {latest.sent_at:%Y-%m-%d %H:%M:%S}Z, "
                f"expires {latest.expires_at:%H:%M:%S}Z)\n"
            )
    if not found:
        who = args.email or "anyone"
        sys.stderr.write(f"no one-time code was sent to {who}\n")
        return 1
    return 0


def _token(args: argparse.Namespace) -> int:
    """Mint a stack access token for a user of `auth.users`, sealed for one run of a flow.

    stdout gets the value only, so it can be piped; `--plain` prints the bare JWT (which a
    flow refuses: it is for calling Supabase, or `tenantflow seal`, yourself).
    """
    from tenantflow_dev.auth_stand_in import UnknownUser, mint_access_token
    from tenantflow_dev.demo import sealed_token

    config = Stack().config
    if not args.plain and not args.flow:
        raise CommandError("--flow is needed: a sealed token is good for one run of one flow")
    try:
        if args.plain:
            value = asyncio.run(
                mint_access_token(
                    config, args.email, operator=args.operator, expires_in=args.expires_in
                )
            )
        else:
            value = asyncio.run(
                sealed_token(
                    config,
                    args.email,
                    flow=args.flow,
                    client_ids=args.client or None,
                    parameters=parameters_of(args.param),
                    ttl_s=args.expires_in,
                    operator=args.operator,
                )
            )
    except (UnknownUser, ValueError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    sys.stdout.write(value + "\n")
    return 0


def _part_at(host: str, port: int) -> str:
    """The local stack's part that listens at host:port, if any (for the message)."""
    try:
        config = StackConfig.from_env()
    except ValueError:
        return ""
    if host not in (config.host, "localhost"):
        return ""
    parts = {
        config.pg_port: "PostgreSQL",
        config.transaction_pooler_port: "the transaction pooler",
        config.session_pooler_port: "the session pooler",
        config.auth_port: "the Supabase Auth stand-in",
        config.prefect_port: "the Prefect server",
        config.redis_port: "the stack's Redis",
        **dict.fromkeys(config.prefect_replica_ports, "a Prefect API replica"),
    }
    return parts.get(port, "")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenantflow-dev", description=__doc__.partition("\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--debug", action="store_true", help="on failure, show the traceback, not one line"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start each part of the local stack that is down")
    up.add_argument(
        "--main-job",
        action="store_true",
        help="also migrate, load the demo data, deploy and run the main job once "
        "(`make up`); without it only a new stack gets the one-shot steps",
    )
    up.add_argument(
        "--services-only",
        action="store_true",
        help="start the services only, even on a new stack (no one-shot steps)",
    )
    up.add_argument(
        "--no-demo-run", action="store_true", help="with --main-job: skip the demo nightly-rollup"
    )
    topology = up.add_mutually_exclusive_group()
    topology.add_argument(
        "--ha",
        dest="topology",
        action="store_const",
        const="ha",
        help="Prefect as several servers: 2 API replicas behind HAProxy, the services in a "
        "process of their own, Redis (kept for this stack folder until `up --single`)",
    )
    topology.add_argument(
        "--single",
        dest="topology",
        action="store_const",
        const="single",
        help="Prefect as one server process (the default for a new stack folder)",
    )
    up.set_defaults(handler=_up)
    down = commands.add_parser("down", help="stop everything the local stack started")
    down.set_defaults(handler=_down)
    status = commands.add_parser("status", help="each part of the stack, its address and health")
    status.add_argument(
        "--secrets",
        action="store_true",
        help="also print the stack's Supabase API keys (anon and service-role)",
    )
    status.set_defaults(handler=_status)
    mailbox = commands.add_parser(
        "mailbox", help="the latest one-time sign-in code the Auth stand-in sent (per user)"
    )
    mailbox.add_argument("--email", help="only this user's (default: every user's)")
    mailbox.add_argument(
        "--code-only", action="store_true", help="with --email: print the bare code"
    )
    mailbox.set_defaults(handler=_mailbox)
    image = commands.add_parser(
        "image", help="build the worker image with podman (cached outside the clone)"
    )
    image.set_defaults(handler=_image)
    restart = commands.add_parser("restart", help="stop one part of the stack and start it again")
    restart.add_argument(
        "part", nargs="?", help="the part to stop and start again, as `status` names it"
    )
    restart.set_defaults(handler=_restart)
    token = commands.add_parser(
        "token",
        help="a local stack user's access token, sealed for one run of a flow",
    )
    token.add_argument("--email", required=True, help="a user of auth.users")
    token.add_argument("--flow", help="the flow the run is of (client-report, nightly-rollup...)")
    token.add_argument(
        "--client",
        action="append",
        type=UUID,
        metavar="CLIENT_ID",
        help="a client id of the run (repeat; none: a sweep of every client)",
    )
    token.add_argument(
        "--param",
        action="append",
        type=parameter_argument,
        metavar="NAME=VALUE",
        help="another parameter of the run, as the run will get it (repeat; the seal binds them)",
    )
    token.add_argument(
        "--operator", action="store_true", help="put the tenantflow_operator grant in the token"
    )
    token.add_argument(
        "--plain", action="store_true", help="print the bare access token, not sealed"
    )
    token.add_argument(
        "--expires-in", type=int, default=900, metavar="S", help="lifetime in seconds (900)"
    )
    token.set_defaults(handler=_token)
    for command in commands.choices.values():
        # NOTE: also after the command (`tenantflow-dev up --debug`); SUPPRESS keeps a
        # `--debug` given before it.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as error:
        code = report_failure(error, debug=args.debug, refusals=(StackError,), name_part=_part_at)
    return code


if __name__ == "__main__":
    sys.exit(main())
