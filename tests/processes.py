"""What the lifecycle tests look for: processes left behind in a folder."""

from __future__ import annotations

import os
from pathlib import Path


def processes_using(folder: Path) -> list[str]:
    """Processes whose command line or working directory lies in `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(folder) in cmdline or cwd.startswith(str(folder)):
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found
