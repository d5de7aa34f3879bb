"""`make image` without its tools: one line saying what to install, nothing built.

The tests hide the tools from the real command (`tenantflow-dev image`, `build_image`)
through the search path only; everything else is the machine's real podman.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tenantflow_dev.podman as podman_module
from tenantflow_dev.errors import StackError
from tenantflow_dev.image import build_image
from tenantflow_dev.podman import INSTALL_HINT, Podman, which

PROJECT = Path(__file__).resolve().parents[2]


def _tools_folder(tmp_path: Path, *tools: str) -> Path:
    """A folder holding links to the real `tools` only: a search path without the rest."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in tools:
        found = which(tool)
        assert found, f"{tool} is not installed here (make test installs it)"
        (folder / tool).symlink_to(found)
    return folder


def test_without_podman_tenantflow_dev_image_says_what_to_install(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": str(_tools_folder(tmp_path, "runc")),
        "TENANTFLOW_IMAGE_CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tenantflow_dev.cli", "image"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=PROJECT,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: podman not installed: ")
    assert "apt-get install podman" in lines[0]
    assert not (tmp_path / "cache" / "storage").exists(), "podman storage made without podman"


def test_without_debootstrap_a_cold_build_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NOTE: runc and debootstrap live in /usr/sbin, which `which` always searches too.
    monkeypatch.setattr(podman_module, "_SBIN", ())
    monkeypatch.setenv("PATH", str(_tools_folder(tmp_path, "podman", "runc")))
    cold = Podman.from_env(cache=tmp_path / "cache")
    with pytest.raises(StackError) as refused:
        build_image(PROJECT, podman=cold)
    assert str(refused.value) == f"debootstrap not installed: {INSTALL_HINT}"
    assert not list((tmp_path / "cache").glob("base/*.tar")), "a base made without debootstrap"
