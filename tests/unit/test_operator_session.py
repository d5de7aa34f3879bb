"""The operator's session file and the refusals that need no Supabase Auth: the file is
0600 in a 0700 folder and written atomically; one others may read, another user owns, or a
link is refused as ssh refuses a private key; no public key, a private key where the public
one belongs, a non-operator asking for an operator flow, Auth unreachable: one line, exit 2,
and never the password; on a terminal, the password is asked without echo."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from tenantflow import operator_session as sessions
from tenantflow.operator_session import OperatorSession, SessionFileUnsafe
from tenantflow.sealing import generate_private_key, public_key
from tenantflow.settings import OperatorSettings, SettingsError, load_operator_settings
from tests.forging import forge
from tests.processes import free_ports

ACCESS = forge({"alg": "ES256"}, {"sub": "x"}, b"signature-access")
REFRESH = "refresh-token-value-abc123"
PASSWORD = "correct-horse-battery-staple-9"


@pytest.fixture(autouse=True)
def _no_operator_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's own stack settings (SEAL_PUBLIC_KEY...) play no part here."""
    for name in ("SEAL_PUBLIC_KEY", "SEAL_PUBLIC_KEY_FILE", "TENANTFLOW_SESSION_FILE"):
        monkeypatch.delenv(name, raising=False)


def _session(expires_in: int = 3600) -> OperatorSession:
    return OperatorSession(
        supabase_url="http://127.0.0.1:9",
        user_id="00000000-0000-4000-8000-000000000001",
        email="op@example.test",
        access_token=SecretStr(ACCESS),
        refresh_token=SecretStr(REFRESH),
        expires_at=int(time.time()) + expires_in,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _settings(**changes: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "supabase_url": "http://127.0.0.1:9",
        "supabase_anon_key": "anon",
        **changes,
    }
    return load_operator_settings(_env_file=None, **values)


def test_a_session_is_written_0600_in_a_0700_folder_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "config" / "tenantflow" / "session.json"
    sessions.write_session(path, _session())
    assert _mode(path.parent) == 0o700
    assert _mode(path) == 0o600
    read = sessions.read_session(path)
    assert read is not None
    assert read.refresh_token.get_secret_value() == REFRESH
    # Nothing else is left in the folder (the temporary file was renamed).
    assert sorted(p.name for p in path.parent.iterdir()) == ["session.json"]
    # A logged session shows no token.
    assert ACCESS not in repr(read) and REFRESH not in repr(read)


def test_the_write_is_atomic_and_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tenantflow" / "session.json"
    sessions.write_session(path, _session())
    before = path.read_text()
    seen: list[int] = []
    real_replace = os.replace

    def replace(source: str, target: str) -> None:
        # What is about to become the session file is already 0600 and complete, and
        # the old file is still whole until the rename.
        seen.append(_mode(Path(source)))
        assert json.loads(Path(source).read_text())["expires_at"] > 0
        assert path.read_text() == before
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    old = os.umask(0)  # the most permissive umask: mkstemp must still give 0600
    try:
        sessions.write_session(path, _session(expires_in=10))
    finally:
        os.umask(old)
    assert seen == [0o600]
    assert _mode(path) == 0o600


def test_a_failed_write_leaves_the_old_session_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tenantflow" / "session.json"
    sessions.write_session(path, _session())
    before = path.read_text()

    def fail(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        sessions.write_session(path, _session(expires_in=10))
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["session.json"]


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        (0o644, "is readable by others (mode 0644); chmod 600"),
        (0o640, "is readable by others (mode 0640); chmod 600"),
        (0o620, "is writable by others (mode 0620); chmod 600"),
    ],
)
def test_a_session_file_others_may_use_is_refused(tmp_path: Path, mode: int, said: str) -> None:
    path = tmp_path / "tenantflow" / "session.json"
    sessions.write_session(path, _session())
    path.chmod(mode)
    with pytest.raises(SessionFileUnsafe) as caught:
        sessions.read_session(path)
    assert f"session file {path} {said} {path}" == str(caught.value)


def test_a_folder_others_may_use_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tenantflow" / "session.json"
    sessions.write_session(path, _session())
    path.parent.chmod(0o755)
    with pytest.raises(SessionFileUnsafe, match=r"is readable by others \(mode 0755\); chmod 700"):
        sessions.read_session(path)
    # Nor is a session written into it.
    with pytest.raises(SessionFileUnsafe, match="chmod 700"):
        sessions.write_session(path, _session())


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a file to another user")
def test_a_session_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tenantflow" / "session.json"
    sessions.write_session(path, _session())
    os.chown(path, 65534, 65534)
    with pytest.raises(SessionFileUnsafe, match="is owned by uid 65534, not by you"):
        sessions.read_session(path)


def test_a_link_or_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tenantflow" / "session.json"
    sessions.write_session(path, _session())
    elsewhere = tmp_path / "elsewhere.json"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    with pytest.raises(SessionFileUnsafe, match="is a symbolic link"):
        sessions.read_session(path)
    path.unlink()
    path.write_text("not json")
    path.chmod(0o600)
    with pytest.raises(SessionFileUnsafe, match="is not a tenantflow session file"):
        sessions.read_session(path)


def test_the_session_file_is_found_where_the_settings_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    default = sessions.session_path(_settings())
    assert default == tmp_path / "xdg" / "tenantflow" / "session.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sessions.session_path(_settings()) == (
        tmp_path / "home" / ".config" / "tenantflow" / "session.json"
    )
    chosen = _settings(tenantflow_session_file=str(tmp_path / "s.json"))
    assert sessions.session_path(chosen) == tmp_path / "s.json"
    assert sessions.session_path(chosen, tmp_path / "flag.json") == tmp_path / "flag.json"


def test_every_operator_setting_is_described_and_the_anon_key_is_secret() -> None:
    for name, info in OperatorSettings.model_fields.items():
        assert info.description, name
    assert isinstance(_settings().supabase_anon_key, SecretStr)
    # The operator's machine has no database settings: none is needed.
    assert not any("database" in name for name in OperatorSettings.model_fields)


def test_the_public_key_comes_only_from_the_operators_settings(tmp_path: Path) -> None:
    private = generate_private_key("seal-test")
    public = public_key(private)
    with pytest.raises(sessions.PublicKeyMissing) as missing:
        sessions.load_public_key(_settings())
    assert "set SEAL_PUBLIC_KEY" in str(missing.value)
    assert "SEAL_PUBLIC_KEY_FILE" in str(missing.value)
    assert "`tenantflow seal-key public`" in str(missing.value)
    assert json.loads(sessions.load_public_key(_settings(seal_public_key=public)))["kid"] == (
        "seal-test"
    )
    key_file = tmp_path / "seal.jwk"
    key_file.write_text(public)
    assert sessions.load_public_key(_settings(seal_public_key_file=str(key_file))) == public
    with pytest.raises(sessions.PublicKeyMissing) as leaked:
        sessions.load_public_key(_settings(seal_public_key=private))
    assert "holds a PRIVATE key" in str(leaked.value)
    assert json.loads(private)["d"] not in str(leaked.value)
    with pytest.raises(SettingsError, match="not both"):
        _settings(seal_public_key=public, seal_public_key_file=str(key_file))
    # A blank line in an env template means: not set.
    assert _settings(seal_public_key="").seal_public_key is None


def test_operator_flows_are_refused_early_for_a_user_without_the_grant() -> None:
    user = {"app_metadata": {"provider": "email", "roles": ["support"]}}
    operator = {"app_metadata": {"roles": ["support", "tenantflow_operator"]}}
    for flow in ("nightly-rollup", "migrate"):
        refusal = sessions.operator_flow_refusal(flow, "bob@example.test", user)
        assert refusal is not None
        assert refusal.startswith(f"{flow} runs only for tenantflow operators, and bob@")
        assert "the worker would refuse the run" in refusal
        assert sessions.operator_flow_refusal(flow, "op@example.test", operator) is None
    assert sessions.operator_flow_refusal("client-report", "bob@example.test", user) is None


def _cli(tmp_path: Path, env: dict[str, str], *args: str, stdin: str = "") -> Any:
    return subprocess.run(
        [sys.executable, "-m", "tenantflow.cli", *args],
        input=stdin,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _one_line(result: Any) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return str(lines[0])


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A shell's environment with Supabase Auth at a port nothing listens on."""
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    (auth,) = free_ports(1)
    return {
        **{key: os.environ[key] for key in keep if key in os.environ},
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "SUPABASE_URL": f"http://127.0.0.1:{auth}",
        "SUPABASE_ANON_KEY": "anon",
    }


def test_cli_refusals_are_one_line_and_never_show_the_password(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    url = cli_env["SUPABASE_URL"]
    login = _cli(
        tmp_path, cli_env, "login", "--email", "op@example.test", "--password-stdin",
        stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert _one_line(login) == (
        f"error: Supabase Auth at {url} does not answer: check SUPABASE_URL, or try again later"
    )
    assert PASSWORD not in login.stdout + login.stderr
    assert not (tmp_path / "xdg" / "tenantflow" / "session.json").exists()

    assert _one_line(_cli(tmp_path, cli_env, "whoami")) == (
        "error: not signed in: run `tenantflow login`"
    )
    no_key = _one_line(_cli(tmp_path, cli_env, "token", "--flow", "nightly-rollup"))
    assert no_key.startswith("error: no public key to seal with: set SEAL_PUBLIC_KEY")

    path = tmp_path / "xdg" / "tenantflow" / "session.json"
    sessions.write_session(path, _session())
    path.chmod(0o644)
    assert _one_line(_cli(tmp_path, cli_env, "whoami")) == (
        f"error: session file {path} is readable by others (mode 0644); chmod 600 {path}"
    )
    # The refused file is left as it was: nothing used it.
    assert _mode(path) == 0o644
    # logout deletes it without sending its tokens anywhere, and says so.
    logout = _cli(tmp_path, cli_env, "logout")
    assert logout.returncode == 0, logout.stderr
    assert "without using it" in logout.stdout
    assert not path.exists()


def _on_a_terminal(tmp_path: Path, env: dict[str, str], *args: str, answer: str) -> str:
    """Everything a terminal shows while `tenantflow ARGS` runs on it, `answer` typed once
    the command asks for it (a pseudo-terminal: its echo is on unless the command turns
    it off)."""
    import pty
    import select

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "tenantflow.cli", *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    os.close(terminal)
    shown = b""
    typed = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the command ended: the terminal is gone
                break
            if not chunk:
                break
            shown += chunk
            if not typed and b"(not echoed): " in shown:
                os.write(controller, answer.encode() + b"\n")
                typed = True
        assert process.wait(timeout=60) == 2, shown
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
    assert typed, shown
    return shown.decode(errors="replace")


def test_login_on_a_terminal_asks_for_the_password_without_echoing_it(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    url = cli_env["SUPABASE_URL"]
    shown = _on_a_terminal(
        tmp_path, cli_env, "login", "--email", "op@example.test", answer=PASSWORD
    )
    assert "password (not echoed): " in shown
    assert PASSWORD not in shown
    # It read the password and took it on to Auth (which does not answer here).
    assert f"error: Supabase Auth at {url} does not answer" in shown
    assert not (tmp_path / "xdg" / "tenantflow" / "session.json").exists()


def test_logout_with_auth_unreachable_still_deletes_the_file(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    path = tmp_path / "xdg" / "tenantflow" / "session.json"
    sessions.write_session(path, _session())
    result = _cli(tmp_path, cli_env, "logout")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"signed out: deleted {path}; its session could NOT be")
    assert "does not answer" in result.stdout
    assert not path.exists()
    for secret in (ACCESS, REFRESH):
        assert secret not in result.stdout + result.stderr


def _unsigned_token(claims: dict[str, Any]) -> str:
    import base64

    def part(document: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")

    return f"{part({'alg': 'ES256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def test_whoami_without_auth_shows_the_tokens_claim_and_says_it_is_unverified(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    path = tmp_path / "xdg" / "tenantflow" / "session.json"
    token = _unsigned_token({"sub": "x", "app_metadata": {"roles": ["tenantflow_operator"]}})
    session = OperatorSession(
        supabase_url=cli_env["SUPABASE_URL"],
        user_id="00000000-0000-4000-8000-000000000001",
        email="op@example.test",
        access_token=SecretStr(token),
        refresh_token=SecretStr(REFRESH),
        expires_at=int(time.time()) + 3600,
    )
    sessions.write_session(path, session)
    result = _cli(tmp_path, cli_env, "whoami")
    assert result.returncode == 0, result.stderr
    assert (
        "operator: yes (app_metadata.roles, as read from the access token (not verified: "
        "Supabase Auth does not answer))" in result.stdout
    )
    assert token not in result.stdout and REFRESH not in result.stdout
    # A session of another project is not used at all.
    other = {**cli_env, "SUPABASE_URL": "http://127.0.0.1:9"}
    assert _one_line(_cli(tmp_path, other, "whoami")).startswith(
        f"error: the session in {path} is for {cli_env['SUPABASE_URL']}, not SUPABASE_URL"
    )
