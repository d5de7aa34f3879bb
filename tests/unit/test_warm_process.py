"""A warm flow-run process on its own: what it takes from the worker, what it loads ahead,
and how it notices code that changed after it started (no stack: real processes only)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tenantflow.flow_run import (
    WARM_FLAG,
    WarmRequest,
    changed_modules,
    flow_imports,
    read_warm_request,
    reserved_environment,
)

ENTRY = "/app/flows/noop.py:noop"


def test_a_request_names_a_declared_entrypoint_and_only_per_run_variables() -> None:
    request = read_warm_request(WarmRequest(ENTRY, {"PREFECT__FLOW_RUN_ID": "x"}).encode(), [ENTRY])
    assert (request.entrypoint, request.env) == (ENTRY, {"PREFECT__FLOW_RUN_ID": "x"})
    with pytest.raises(ValueError, match="entrypoint"):
        read_warm_request(WarmRequest("/srv/evil.py:f", {}).encode(), [ENTRY])
    for refused in ({"PYTHONPATH": "/srv"}, {"PREFECT_API_URL": "http://evil"}, {"A": "b"}):
        with pytest.raises(ValueError, match="PREFECT__"):
            read_warm_request(WarmRequest(ENTRY, refused).encode(), [ENTRY])
    with pytest.raises(ValueError):
        read_warm_request(b"not json\n", [ENTRY])
    with pytest.raises(ValueError):
        read_warm_request(
            json.dumps({"entrypoint": ENTRY, "env": {"PREFECT__X": 1}}).encode(), [ENTRY]
        )


def test_flow_imports_are_read_from_the_files_without_the_flows_package(tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "one.py").write_text(
        "from __future__ import annotations\nimport a.b, c\nfrom d.e import f\n"
        "from . import sibling\nfrom flows import other\nimport flows.more\n"
        "def f():\n    import lazy.inside\n"
    )
    (flows / "two.py").write_text("from d.e import g\nimport h\n")
    entrypoints = [f"{flows / 'one.py'}:f", f"{flows / 'two.py'}:g", f"{flows / 'gone.py'}:x"]
    assert flow_imports(entrypoints) == ["a.b", "c", "d.e", "lazy.inside", "h"]


def test_changed_modules_sees_a_touched_or_removed_file(tmp_path: Path) -> None:
    name = f"warm_probe_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text("VALUE = 1\n")
    past = time.time() - 100
    os.utime(path, (past, past))
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module(name)
        since = time.time() - 10
        assert name not in changed_modules(since)
        os.utime(path, None)
        assert name in changed_modules(since)
        path.unlink()
        assert name in changed_modules(since)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def _warm_process(project: Path) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT")},
        "PYTHONPATH": str(project / "lib"),
        # NOTE: nothing answers there: the run fails at once, after what is tested here.
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "PREFECT_CLIENT_MAX_RETRIES": "0",
        **reserved_environment(),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tenantflow.flow_run", WARM_FLAG, _entry(project)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=project,
    )


def _entry(project: Path) -> str:
    return f"{project / 'flows' / 'probe.py'}:probe"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "lib").mkdir()
    (tmp_path / "flows").mkdir()
    lib = tmp_path / "lib" / "warmlib.py"
    lib.write_text("VALUE = 1\n")
    past = time.time() - 100
    os.utime(lib, (past, past))
    (tmp_path / "flows" / "probe.py").write_text(
        "import warmlib\nfrom prefect import flow\n\n@flow\ndef probe():\n    pass\n"
    )
    return tmp_path


@pytest.mark.parametrize("touched", [True, False])
def test_a_module_changed_after_the_start_sends_the_run_cold(project: Path, touched: bool) -> None:
    process = _warm_process(project)
    if touched:
        os.utime(project / "lib" / "warmlib.py", None)  # a deploy, while it waits
    request = WarmRequest(_entry(project), {"PREFECT__FLOW_RUN_ID": str(uuid.uuid4())})
    _, stderr = process.communicate(request.encode(), timeout=120)
    said = stderr.decode(errors="replace")
    assert ("changed since it started (warmlib" in said) is touched, said
    assert "do not fit" not in said
    assert process.returncode != 0  # no API: the run itself fails, cold or warm


def test_a_warm_process_with_no_request_exits_quietly(project: Path) -> None:
    process = _warm_process(project)
    stdout, stderr = process.communicate(b"", timeout=120)
    assert (process.returncode, stdout, stderr) == (0, b"", b"")


def test_a_refused_request_runs_nothing(project: Path) -> None:
    process = _warm_process(project)
    request = WarmRequest(_entry(project), {"PYTHONPATH": "/srv"})
    _, stderr = process.communicate(request.encode(), timeout=120)
    assert process.returncode != 0
    assert b"may set only PREFECT__" in stderr


SHOW = """
import os, sys
from tenantflow.flow_run import publish_environment
value = sys.argv[1]
fitted = publish_environment({"PREFECT__FLOW_RUN_ID": value, "PREFECT__FLOW_NAME": "probe"})
os.environ["PREFECT__FLOW_RUN_ID"] = value
raw = open(f"/proc/{os.getpid()}/environ", "rb").read().split(b"\\0")
print(fitted, [item.decode() for item in raw if item.startswith(b"PREFECT__")])
"""


@pytest.mark.parametrize("length", [36, 9000])
def test_the_runs_variables_show_in_its_process_environment(length: int) -> None:
    value = "r" * length
    shown = subprocess.run(
        [sys.executable, "-c", SHOW, value],
        env={"PATH": os.environ["PATH"], **reserved_environment()},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if length < 8000:
        wanted = ["PREFECT__FLOW_RUN_ID=" + value, "PREFECT__FLOW_NAME=probe"]
        assert shown.strip() == f"True {wanted}"
    else:  # too long for the reserved bytes: nothing written, the run goes cold
        assert shown.strip().startswith("False ['PREFECT__RESERVED_FOR_RUN=...")


SHARED_TLS = """
import ssl
from prefect.client.orchestration import PrefectClient
from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings
from tenantflow.flow_run import share_prefect_tls_context

def context(client):
    return client._client._transport._pool._ssl_context

before = [context(PrefectClient("https://prefect.invalid/api")) for _ in range(2)]
share_prefect_tls_context()
after = [context(PrefectClient("https://prefect.invalid/api")) for _ in range(2)]
with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
    insecure = context(PrefectClient("https://prefect.invalid/api"))
print(before[0] is before[1], after[0] is after[1],
      after[0].verify_mode == ssl.CERT_REQUIRED and after[0].check_hostname,
      insecure is not after[0] and insecure.verify_mode == ssl.CERT_NONE,
      after[0].verify_mode == ssl.CERT_REQUIRED)
"""


def test_prefects_clients_share_one_verified_tls_context_and_only_that() -> None:
    shown = subprocess.run(
        [sys.executable, "-c", SHARED_TLS],
        env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Made afresh per client before; one after; the unverified one still its own, and
    # making it changed nothing of the shared one.
    assert shown.split() == ["False", "True", "True", "True", "True"], shown


PRIMED_TLS = """
import shutil, sys, certifi
from prefect.client.orchestration import PrefectClient
from prefect.settings import PREFECT_API_SSL_CERT_FILE, temporary_settings
from tenantflow.flow_run import share_prefect_tls_context

def context(client):
    return client._client._transport._pool._ssl_context

bundle = sys.argv[1]
shutil.copy(certifi.where(), bundle)
with temporary_settings({PREFECT_API_SSL_CERT_FILE: bundle}):
    shared = share_prefect_tls_context()
    shared.prime()
    primed = shared._contexts[bundle][1]
    first = context(PrefectClient("https://prefect.invalid/api"))
    with open(bundle, "a") as file:
        file.write("\\n")
    renewed = context(PrefectClient("https://prefect.invalid/api"))
    again = context(PrefectClient("https://prefect.invalid/api"))
print(first is primed, renewed is not primed, again is renewed)
"""


def test_a_warm_process_makes_the_tls_context_ahead_and_again_when_the_ca_file_changes(
    tmp_path: Path,
) -> None:
    shown = subprocess.run(
        [sys.executable, "-c", PRIMED_TLS, str(tmp_path / "ca.pem")],
        env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.split() == ["True", "True", "True"], shown
