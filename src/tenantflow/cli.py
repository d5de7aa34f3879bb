"""The `tenantflow` command: migrations, sealing, the worker, deployments, and an operator's
own sign-in (`login`, `whoami`, `token`, `logout`, `operator`).

Every command fails in one line on stderr with what to do (`--debug` adds the traceback);
`report_failure` is that reporting, public so other commands (the dev stack's
`tenantflow-dev`) report the same way. The local dev stack is not part of the product: it
is `tenantflow-dev`, a distribution of its own that this module never imports.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tenantflow.errors import TenantflowError

if TYPE_CHECKING:
    from pydantic import SecretStr

    from tenantflow.settings import OperatorSettings, SealSettings

__all__ = [
    "CommandError",
    "ProjectNotFound",
    "main",
    "parameter_argument",
    "parameters_of",
    "report_failure",
]

log = logging.getLogger("tenantflow")


def _migrate(args: argparse.Namespace) -> int:
    """Migrate from this machine, with its MIGRATION_DATABASE_URL (the owner's login).

    NOTE: the `migrate` deployment is for operators and only upgrades; this command is
    for whoever holds the owner's credentials, and the only way to downgrade.
    """
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # NOTE: imported here so the other commands stay free of Alembic; its errors
    # (MigrationError, SettingsError) are reported by `main()`.
    from tenantflow.migrate import run_migration

    if args.downgrade_to and not args.dry_run and not args.yes:
        raise CommandError(
            "a downgrade drops tables and their data: run it again with --yes to confirm "
            "(or --dry-run to see the SQL first)"
        )
    result = asyncio.run(
        run_migration(revision=args.revision, dry_run=args.dry_run, downgrade_to=args.downgrade_to)
    )
    if result.dry_run and result.sql:
        log.info("%s", result.sql)
    log.info("%s", result.summary())
    return 0


def _project_dir() -> Path:
    """The folder with `prefect.yaml`: TENANTFLOW_PROJECT_DIR, the cwd, or the checkout."""
    checkout = Path(__file__).resolve().parents[2]
    for folder in (Path(os.environ.get("TENANTFLOW_PROJECT_DIR") or Path.cwd()), checkout):
        if (folder / "prefect.yaml").is_file():
            return folder.resolve()
    raise ProjectNotFound("prefect.yaml not found: run `tenantflow deploy` from the project folder")


def _deploy(args: argparse.Namespace) -> int:
    """Bootstrap the Prefect installation, then `prefect --no-prompt deploy` everything."""
    from dotenv import dotenv_values

    from tenantflow.automations import Alerts
    from tenantflow.deployments import WORK_POOLS, bootstrap, deploy
    from tenantflow.settings import load_settings

    if args.image and args.pool_type == "process":
        raise CommandError(
            "--image is for docker and kubernetes pools; process workers run in place"
        )
    project = _project_dir()
    # NOTE: like pydantic-settings and Prefect, the environment wins over the project's .env.
    dotenv = {k: v for k, v in dotenv_values(project / ".env").items() if v is not None}
    env = {key: value for key, value in dotenv.items() if key not in os.environ}
    api_url = os.environ.get("PREFECT_API_URL") or dotenv.get("PREFECT_API_URL")
    auth_string = os.environ.get("PREFECT_API_AUTH_STRING") or dotenv.get("PREFECT_API_AUTH_STRING")
    if not api_url:
        raise CommandError(
            f"PREFECT_API_URL is not set (nor in {project / '.env'}): run `make up` or export it"
        )
    # NOTE: SettingsError, BootstrapError and DeployError are reported by `main()`.
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
        alerts=Alerts.from_settings(settings),
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
    log.info(
        "deployed %s onto work pool %s in %.1fs",
        ", ".join(deployed.deployments),
        deployed.work_pool,
        deployed.seconds,
    )
    return 0


class CommandError(TenantflowError):
    """A command's refusal: one line for stderr, exit code 2."""


class ProjectNotFound(CommandError):
    """No folder with `prefect.yaml` (TENANTFLOW_PROJECT_DIR, the cwd, or the checkout)."""


def _seal_settings() -> SealSettings:
    """`SealSettings` of the environment and `.env`, without the database settings."""
    from tenantflow.settings import SettingsError, load_seal_settings

    try:
        return load_seal_settings()
    except SettingsError as error:
        # NOTE: one line: the settings message lists fields on separate lines.
        raise CommandError(" ".join(str(error).split())) from None


def _seal_key(args: argparse.Namespace) -> int:
    """`seal-key generate` prints a new private key; `seal-key public` the current public key."""
    from tenantflow.sealing import SealError, generate_private_key, public_key

    try:
        if args.action == "generate":
            sys.stdout.write(generate_private_key(args.kid) + "\n")
            sys.stderr.write(
                "Install it on every worker as SEAL_PRIVATE_KEYS (a JWK, or a JWK Set "
                '{"keys": [NEW, OLD, ...]} to rotate: the new key first, the old ones kept '
                "until the values sealed to them have expired), then hand "
                "`tenantflow seal-key public` to whoever seals tokens.\n"
            )
            return 0
        keys = _seal_settings().seal_private_keys
        if keys is None:
            raise CommandError(
                "SEAL_PRIVATE_KEYS is not set (environment or .env): `make up` writes it to "
                ".env for the local stack; elsewhere `tenantflow seal-key generate` makes one"
            )
        sys.stdout.write(public_key(keys.get_secret_value(), args.kid) + "\n")
    except SealError as error:
        raise CommandError(str(error)) from None
    return 0


def _read_public_key(value: str) -> str:
    """--public-key: JWK JSON text, or a file holding it."""
    if value.lstrip().startswith("{"):
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except OSError as error:
        raise CommandError(f"cannot read the public key file {value}: {error.strerror}") from None


def _read_token() -> str:
    """The plain access token, one line on stdin (prompted without echo on a terminal)."""
    if sys.stdin.isatty():
        import getpass

        text = getpass.getpass("access token (not echoed): ")
    else:
        text = sys.stdin.read()
    token = text.strip()
    if not token:
        raise CommandError(
            "no access token on standard input; pipe it in, "
            "e.g. `tenantflow-dev token --email E | tenantflow seal --flow FLOW --client ID`"
        )
    if any(char.isspace() for char in token):
        raise CommandError("standard input must hold the access token alone, on one line")
    return token


_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parameter_argument(text: str) -> tuple[str, object]:
    """`NAME=VALUE` of `--param`: the value is JSON where it parses (`false`, `3`,
    `["a"]`), else the text itself (`2026-11-01`, `head`)."""
    import json

    name, equals, value = text.partition("=")
    if not equals or not _PARAMETER_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text[:40]!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def parameters_of(pairs: Sequence[tuple[str, object]] | None) -> dict[str, object]:
    """The `--param` pairs as a run's parameters; a name given twice is refused."""
    parameters: dict[str, object] = {}
    for name, value in pairs or ():
        if name in parameters:
            raise CommandError(f"--param {name} is given twice")
        parameters[name] = value
    return parameters


def _seal(args: argparse.Namespace) -> int:
    """Seal a plain access token (stdin) to the workers' public key; stdout gets the value."""
    from tenantflow.sealing import SealError, public_key, seal_access_token

    settings = _seal_settings()
    if args.public_key is not None:
        jwk = _read_public_key(args.public_key)
    elif settings.seal_private_keys is not None:
        try:
            jwk = public_key(settings.seal_private_keys.get_secret_value())
        except SealError as error:
            raise CommandError(str(error)) from None
    else:
        raise CommandError(
            "no public key: pass --public-key FILE_OR_JSON (the workers' public JWK, from "
            "`tenantflow seal-key public`) or set SEAL_PRIVATE_KEYS"
        )
    ttl = settings.seal_default_ttl_s if args.ttl is None else args.ttl
    parameters = parameters_of(args.param)
    token = _read_token()
    now = time.time()
    try:
        sealed = seal_access_token(
            token,
            jwk,
            flow=args.flow,
            client_ids=args.client,
            parameters=parameters,
            ttl_s=ttl,
            now=now,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    clients = ", ".join(args.client) if args.client else "every active client"
    bound = ", ".join(f"{name}={value}" for name, value in parameters.items()) or "none"
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(now) + ttl))
    sys.stderr.write(
        f"sealed for one run of flow {args.flow}, {clients}; other parameters: {bound}; "
        f"valid until {expires}\n"
    )
    sys.stdout.write(sealed + "\n")
    return 0


def _add_binding_arguments(parser: argparse.ArgumentParser) -> None:
    """`--client` and `--param`: what a seal is bound to besides the flow."""
    parser.add_argument(
        "--client",
        action="append",
        metavar="ID",
        help="a client id of the run (repeat for several; none: every active client)",
    )
    parser.add_argument(
        "--param",
        action="append",
        type=parameter_argument,
        metavar="NAME=VALUE",
        help=(
            "another parameter of the run, exactly as the run will get it (repeat; the seal "
            "opens only in a run with these parameters; those left at their defaults may "
            "be left out)"
        ),
    )


def _add_seal_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    seal_key = commands.add_parser(
        "seal-key", help="the workers' key pair for sealed access tokens"
    )
    seal_key.add_argument(
        "action",
        choices=["generate", "public"],
        help="generate: print a new private key; public: the public key of SEAL_PRIVATE_KEYS",
    )
    seal_key.add_argument(
        "--kid", help="generate: the new key's id; public: which key (default: the first)"
    )
    seal_key.set_defaults(handler=_seal_key)
    seal = commands.add_parser(
        "seal", help="seal an access token (read from stdin) for a flow run's parameters"
    )
    seal.add_argument("--flow", required=True, help="the flow that may open it, e.g. client-report")
    _add_binding_arguments(seal)
    seal.add_argument(
        "--ttl", type=int, metavar="SECONDS", help="lifetime (default SEAL_DEFAULT_TTL_S, 900)"
    )
    seal.add_argument(
        "--public-key",
        metavar="FILE_OR_JSON",
        help="the workers' public JWK (default: derived from SEAL_PRIVATE_KEYS)",
    )
    seal.set_defaults(handler=_seal)


def _operator_settings() -> OperatorSettings:
    """`OperatorSettings` of the environment and `.env`: no database, no private key."""
    from tenantflow.settings import SettingsError, load_operator_settings

    try:
        return load_operator_settings()
    except SettingsError as error:
        raise CommandError(" ".join(str(error).split())) from None


def _operator_command(
    handler: Callable[[argparse.Namespace, OperatorSettings], int],
) -> Callable[[argparse.Namespace], int]:
    """Run an operator command; its refusals (`OperatorSessionError`) end in one line, exit 2."""

    def run(args: argparse.Namespace) -> int:
        from tenantflow.operator_session import OperatorSessionError

        try:
            return handler(args, _operator_settings())
        except OperatorSessionError as error:
            raise CommandError(str(error)) from None

    return run


def _secret_line(what: str, *, from_stdin: bool, flag: str) -> SecretStr:
    """A secret: one line of stdin (`flag`), or asked without echo on a terminal."""
    from pydantic import SecretStr

    if from_stdin:
        text = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        import getpass

        text = getpass.getpass(f"{what} (not echoed): ")
    else:
        raise CommandError(
            f"no terminal to ask for the {what}: pass {flag} and give it on standard input"
        )
    if not text:
        raise CommandError(f"no {what} given")
    return SecretStr(text)


def _email(args: argparse.Namespace) -> str:
    email: str | None = args.email
    if email is None and sys.stdin.isatty() and not (args.password_stdin or args.code_stdin):
        email = input("email: ")
    if not email or not email.strip():
        raise CommandError("--email is required (no terminal to ask for it)")
    return email.strip()


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _login(args: argparse.Namespace, settings: OperatorSettings) -> int:
    """Sign in with a password or an emailed code; the session goes to the session file."""
    from tenantflow import operator_session as sessions

    if args.code_stdin and not args.otp:
        raise CommandError("--code-stdin goes with --otp")
    path = sessions.session_path(settings, args.session_file)
    email = _email(args)
    if args.otp:
        sessions.request_otp(settings, email=email)
        sys.stderr.write(f"a one-time code was sent to {email}\n")
        code = _secret_line("code", from_stdin=args.code_stdin, flag="--code-stdin")
        session = sessions.login_with_otp(settings, path, email=email, code=code)
    else:
        password = _secret_line("password", from_stdin=args.password_stdin, flag="--password-stdin")
        session = sessions.login_with_password(settings, path, email=email, password=password)
    sys.stdout.write(
        f"signed in as {session.email} (user {session.user_id}); session kept in {path} "
        f"(mode 0600); access token until {_utc(session.expires_at)}, then refreshed\n"
    )
    return 0


def _logout(args: argparse.Namespace, settings: OperatorSettings) -> int:
    from tenantflow.operator_session import logout

    sys.stdout.write(logout(settings, args.session_file) + "\n")
    return 0


def _whoami(args: argparse.Namespace, settings: OperatorSettings) -> int:
    from tenantflow.operator_session import whoami

    who = whoami(settings, args.session_file)
    grant = "yes" if who.operator else "no"
    left = max(0, int(who.expires_at - time.time()))
    sys.stdout.write(
        f"{who.email} (user id {who.user_id})\n"
        f"operator: {grant} (app_metadata.roles, as read from {who.operator_source})\n"
        f"access token expires {_utc(who.expires_at)} (in {left // 60} min {left % 60} s); "
        "it is refreshed with the refresh token until `tenantflow logout`\n"
        f"session file: {who.session_file}\n"
    )
    return 0


#: The run parameter that names the clients, by flow (the others take `client_ids`).
_CLIENT_PARAMETER = {"client-report": "client_id"}


def _token(args: argparse.Namespace, settings: OperatorSettings) -> int:
    """Seal the signed-in user's access token for one run; stdout gets the sealed value only."""
    from tenantflow.operator_session import sealed_token_for_run

    parameters = parameters_of(args.param)
    clients: list[str] = args.client or []
    client_parameter = _CLIENT_PARAMETER.get(args.flow, "client_ids")
    if client_parameter == "client_id" and len(clients) != 1:
        raise CommandError(f"{args.flow} runs for one client: give exactly one --client ID")
    ttl = 900 if args.ttl is None else args.ttl
    now = time.time()
    try:
        sealed = sealed_token_for_run(
            settings,
            flow=args.flow,
            client_ids=clients or None,
            parameters=parameters,
            ttl_s=ttl,
            session_file=args.session_file,
            now=now,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    if client_parameter == "client_id":
        beside = [f"client_id={clients[0]}"]
    elif clients:
        beside = ["client_ids=" + _json_list(clients)]
    else:
        beside = ["client_ids left empty (every active client)"]
    beside += [f"{name}={value}" for name, value in parameters.items()]
    sys.stderr.write(
        f"sealed for one run of {args.flow}, valid until {_utc(int(now) + ttl)}; enter beside "
        f"it exactly: {', '.join(beside)}\n"
    )
    sys.stdout.write(sealed + "\n")
    return 0


def _json_list(values: Sequence[str]) -> str:
    """`values` as the JSON list a run form takes."""
    import json

    return json.dumps(list(values))


def _operator(args: argparse.Namespace, settings: OperatorSettings) -> int:
    """Grant, revoke or list the operator role with the service-role key (never stored)."""
    from tenantflow import operator_session as sessions

    if args.action != "list" and not args.email:
        raise CommandError(f"operator {args.action} needs the user's EMAIL")
    key = _secret_line(
        "service-role key", from_stdin=args.service_role_key_stdin, flag="--service-role-key-stdin"
    )
    if args.action == "list":
        for email in sessions.list_operators(settings, key):
            sys.stdout.write(email + "\n")
        return 0
    change = sessions.grant_operator if args.action == "grant" else sessions.revoke_operator
    changed = change(settings, key, args.email)
    done = {"grant": "is now an operator", "revoke": "is no longer an operator"}[args.action]
    sys.stdout.write(f"{args.email} {done}" + ("" if changed else " (no change)") + "\n")
    if args.action == "revoke" and changed:
        sys.stderr.write(
            "tokens issued before still claim the grant until they expire; workers read the "
            "grant again from auth.users for every run, so they no longer act as operator\n"
        )
    return 0


def _add_session_file_argument(parser: argparse.ArgumentParser) -> None:
    """`--session-file`: where the signed-in operator's session is kept."""
    parser.add_argument(
        "--session-file",
        type=Path,
        metavar="PATH",
        help="the session file (default TENANTFLOW_SESSION_FILE, else "
        "$XDG_CONFIG_HOME/tenantflow/session.json)",
    )


def _add_operator_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    login = commands.add_parser("login", help="sign in to Supabase Auth as yourself (operator)")
    login.add_argument("--email", help="your email (asked on a terminal when left out)")
    how = login.add_mutually_exclusive_group()
    how.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from one line of standard input (scripts)",
    )
    how.add_argument(
        "--otp", action="store_true", help="sign in with a one-time code sent by email instead"
    )
    login.add_argument(
        "--code-stdin",
        action="store_true",
        help="with --otp: read the code from one line of standard input",
    )
    _add_session_file_argument(login)
    login.set_defaults(handler=_operator_command(_login))
    logout = commands.add_parser(
        "logout", help="sign this session out at Supabase Auth and delete the session file"
    )
    _add_session_file_argument(logout)
    logout.set_defaults(handler=_operator_command(_logout))
    whoami = commands.add_parser(
        "whoami", help="who is signed in, whether they are an operator, until when"
    )
    _add_session_file_argument(whoami)
    whoami.set_defaults(handler=_operator_command(_whoami))
    token = commands.add_parser(
        "token", help="your access token sealed for one run of a flow (stdout: the value only)"
    )
    token.add_argument("--flow", required=True, help="the flow of the run, e.g. client-report")
    _add_binding_arguments(token)
    token.add_argument(
        "--ttl", type=int, metavar="SECONDS", help="lifetime of the sealed value (default 900)"
    )
    _add_session_file_argument(token)
    token.set_defaults(handler=_operator_command(_token))
    operator = commands.add_parser(
        "operator", help="grant, revoke or list the operator role (needs the service-role key)"
    )
    operator.add_argument("action", choices=["grant", "revoke", "list"])
    operator.add_argument("email", nargs="?", help="the user's email (grant, revoke)")
    operator.add_argument(
        "--service-role-key-stdin",
        action="store_true",
        help="read the service-role key from one line of standard input (else asked, not echoed)",
    )
    operator.set_defaults(handler=_operator_command(_operator))


def _run(args: argparse.Namespace, settings: OperatorSettings) -> int:
    """Start a run of a declared deployment as the signed-in operator; with --watch, follow
    it and exit 0 only when it ends Completed."""
    from tenantflow.launch import LaunchError, run_url, start_run, watch_run
    from tenantflow.operator_session import access_token_for_flow, load_public_key

    public = load_public_key(settings)
    # NOTE: a deployment is named after its flow here (`client-report`, or
    # `client-report/client-report`): an operator flow is refused before any run exists.
    flow = args.deployment.partition("/")[0]
    token = access_token_for_flow(settings, flow, args.session_file)
    parameters = parameters_of(args.param)
    try:
        project: Path | None = _project_dir()
    except ProjectNotFound:
        project = None  # NOTE: the Prefect API's deployment and its schema decide

    def show(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def launch() -> int:
        run_id = await start_run(
            args.deployment,
            access_token=token,
            public_key=public,
            client_ids=args.client,
            parameters=parameters,
            ttl_s=900 if args.ttl is None else args.ttl,
            project_dir=project,
        )
        show(f"flow run {run_id}: {run_url(run_id) or 'started (no PREFECT_UI_URL to link to)'}")
        if not args.watch:
            return 0
        outcome = await watch_run(run_id, printer=show)
        if outcome.completed:
            return 0
        reason = f": {outcome.message}" if outcome.message else ""
        sys.stderr.write(f"error: flow run {run_id} ended {outcome.state_name}{reason}\n")
        return 1

    try:
        return asyncio.run(launch())
    except LaunchError as error:
        raise CommandError(str(error)) from None


def _add_run_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run", help="start a run of a deployment as the signed-in operator (--watch: follow it)"
    )
    run.add_argument("deployment", metavar="DEPLOYMENT", help="e.g. nightly-rollup, migrate")
    _add_binding_arguments(run)
    run.add_argument(
        "--watch",
        action="store_true",
        help="follow the run (states, log lines, artifacts); exit 0 only when Completed",
    )
    run.add_argument(
        "--ttl", type=int, metavar="SECONDS", help="lifetime of the sealed token (default 900)"
    )
    _add_session_file_argument(run)
    run.set_defaults(handler=_operator_command(_run))


def _worker(args: argparse.Namespace) -> int:
    """Serve a work pool with its tenantflow worker until SIGTERM or SIGINT: the docker
    worker for `tenantflow-docker`, the kubernetes one for `tenantflow-kubernetes`, the
    process worker for any other pool."""
    from tenantflow.deployments import WORK_POOLS
    from tenantflow.worker import run_worker

    containers = {
        WORK_POOLS["docker"]: ("docker", "tenantflow.docker_worker", "TenantflowDockerWorker"),
        WORK_POOLS["kubernetes"]: (
            "kubernetes",
            "tenantflow.kubernetes_worker",
            "TenantflowKubernetesWorker",
        ),
    }
    if args.pool not in containers:
        return run_worker(args.pool, name=args.name, limit=args.limit)
    extra, module, name = containers[args.pool]
    try:
        worker_class = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as missing:
        raise CommandError(
            f"{args.pool} needs the {extra} extra ({missing.name} is not installed): "
            f"pip install 'tenantflow[{extra}]' (the worker image has the process worker only)"
        ) from None
    return run_worker(args.pool, name=args.name, limit=args.limit, worker_class=worker_class)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(
        prog="tenantflow", description=__doc__.partition("\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--debug", action="store_true", help="on failure, show the traceback, not one line"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser(
        "migrate",
        help="upgrade (or --dry-run, or --downgrade-to) through the session pooler",
    )
    migrate.add_argument("--revision", default="head", help="revision to upgrade to (head)")
    migrate.add_argument("--dry-run", action="store_true", help="print the SQL, change nothing")
    migrate.add_argument(
        "--downgrade-to", metavar="REVISION", help="downgrade to this revision id, or base"
    )
    migrate.add_argument(
        "--yes", action="store_true", help="confirm a downgrade (it drops tables and data)"
    )
    migrate.set_defaults(handler=_migrate)
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
    _add_seal_commands(commands)
    _add_operator_commands(commands)
    _add_run_command(commands)
    worker = commands.add_parser(
        "worker",
        help="serve a work pool; job variables cannot change what a flow run runs",
    )
    worker.add_argument(
        "--pool",
        required=True,
        help="the work pool (it must exist): a process pool, tenantflow-docker (flow runs "
        "as containers, DOCKER_HOST) or tenantflow-kubernetes (flow runs as Jobs)",
    )
    worker.add_argument("--name", help="the worker's name (default: Prefect's generated one)")
    worker.add_argument(
        "--limit", type=int, metavar="N", help="at most N flow runs at once (no limit)"
    )
    worker.set_defaults(handler=_worker)
    for command in commands.choices.values():
        # NOTE: also after the command (`tenantflow migrate --debug`); SUPPRESS keeps a
        # `--debug` given before it.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as error:
        # NOTE: every failure ends in one line on stderr (see _explain); --debug adds the
        # traceback.
        code = report_failure(error, debug=args.debug)
    return code


_STACK_HINT = "is the local stack running? `make up` or `tenantflow-dev status`"


def _chain(error: BaseException) -> list[BaseException]:
    """`error`, then what it wraps (causes, contexts, SQLAlchemy's `orig`, groups)."""
    found: list[BaseException] = []
    pending: list[BaseException] = [error]
    while pending and len(found) < 20:
        current = pending.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        orig = getattr(current, "orig", None)
        for inner in (current.__cause__, current.__context__, orig):
            if isinstance(inner, BaseException):
                pending.append(inner)
    return found


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


#: Names the part that listens at host:port for a message ("the session pooler"), or "".
PartNamer = Callable[[str, int], str]

#: The settings whose URLs name the servers a command talks to, and what to call each.
_URL_PARTS = (
    ("MIGRATION_DATABASE_URL", "the session pooler"),
    ("DATABASE_URL", "the transaction pooler"),
    ("SUPABASE_URL", "Supabase Auth"),
    ("PREFECT_API_URL", "the Prefect server"),
)
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _same_host(one: str, other: str) -> bool:
    return one == other or (one in _LOOPBACK and other in _LOOPBACK)


def _part_at(host: str, port: int) -> str:
    """The server at host:port, as the configured URLs name it (for the message).

    NOTE: from the settings a command itself reads (the environment first, then `.env`),
    so the name is right wherever the URLs point: the local stack or a Supabase project.
    """
    from dotenv import dotenv_values

    values = {**dotenv_values(".env"), **os.environ}
    for variable, part in _URL_PARTS:
        url = values.get(variable)
        if not url:
            continue
        try:
            split = urlsplit(url)
            url_host, url_port = split.hostname, split.port
        except ValueError:
            continue
        if url_port == port and url_host is not None and _same_host(url_host, host):
            return part
    return ""


def _http_explanation(error: BaseException) -> str | None:
    import httpx

    if not isinstance(error, httpx.HTTPError):
        return None
    try:
        url = str(error.request.url)
    except RuntimeError:
        url = "the server"
    if "/api/" in url:
        url = url[: url.index("/api/") + len("/api")]
    what = "the Prefect API" if "/api" in url and "/auth/" not in url else "the server"
    if "/auth/v1" in url:
        what = "Supabase Auth"
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        if status in (401, 403):
            return (
                f"{what} at {url} refused the credentials ({status}): check "
                "PREFECT_API_AUTH_STRING (or the keys) in .env, or run `make up` to write it"
            )
        return f"{what} at {url} answered {status}: {_one_line(error.response.text)[:200]}"
    if isinstance(error, httpx.TimeoutException):
        return f"{what} at {url} did not answer in time: {_STACK_HINT}"
    return f"{what} at {url} does not answer ({type(error).__name__}): {_STACK_HINT}"


def _explain(
    error: BaseException,
    refusals: tuple[type[BaseException], ...],
    name_part: PartNamer | None,
) -> str | None:
    """One sentence, with what to do, for the failures a command meets; None if unknown."""
    import asyncpg

    from tenantflow.settings import SettingsError

    for current in _chain(error):
        if isinstance(current, SettingsError):
            return (
                f"settings: {_one_line(current)}. Set them in the environment or in .env "
                "(`make up` writes .env for the local stack)"
            )
        if isinstance(current, (CommandError, *refusals)):
            return _one_line(current)
        explained = _http_explanation(current)
        if explained:
            return explained
        if isinstance(current, ConnectionRefusedError | ConnectionResetError):
            match = re.search(r"\('?([\w.:-]+?)'?, (\d+)\)", str(current))
            if match:
                host, port = match.group(1), int(match.group(2))
                part = (name_part(host, port) if name_part else "") or _part_at(host, port)
                where = f"{part} at {host}:{port}" if part else f"{host}:{port}"
                return f"{where} does not answer (connection refused): {_STACK_HINT}"
            return f"connection refused ({_one_line(current)}): {_STACK_HINT}"
        if isinstance(
            current, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
        ):
            return (
                f"the database refused the login ({_one_line(current)}): check the "
                "database URLs in .env (`make up` writes them)"
            )
        if isinstance(current, asyncpg.PostgresError):
            return f"the database refused: {type(current).__name__}: {_one_line(current)}"
    for current in _chain(error):
        if isinstance(current, TimeoutError):
            return f"timed out ({_one_line(current) or 'no answer'}): {_STACK_HINT}"
        if isinstance(current, TenantflowError) and str(current).strip():
            # NOTE: our own errors (MigrationError, DeployError, SealError...) say what
            # went wrong in their message and name no secret.
            return _one_line(current)
        if isinstance(current, OSError) and current.strerror:
            where = f" ({current.filename})" if current.filename else ""
            return f"{current.strerror}{where}"
    return None


def report_failure(
    error: BaseException,
    *,
    debug: bool,
    refusals: tuple[type[BaseException], ...] = (),
    name_part: PartNamer | None = None,
) -> int:
    """Report `error` on stderr in one line (with --debug, its traceback too).

    Returns the exit code: 2 for a refusal (`CommandError`, or one of `refusals`), else 1.
    `name_part` names the servers a refused connection was for, before the configured URLs.
    """
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    explained = _explain(error, refusals, name_part)
    if explained is not None:
        sys.stderr.write(f"error: {explained}\n")
        return 2 if isinstance(error, (CommandError, *refusals)) else 1
    first = (str(error).strip().splitlines() or [""])[0]
    hint = "" if debug else " (run with --debug for the traceback)"
    sys.stderr.write(f"error: {type(error).__name__}: {first}{hint}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
