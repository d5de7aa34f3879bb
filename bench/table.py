"""The results table of `make bench`: printed, and written to `bench/results.md`."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"


def say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Row:
    """One measure against its baseline; `met` is None where there is no target."""

    measure: str
    result: str
    baseline: str
    ratio: str
    target: str = "-"
    met: bool | None = None

    def cells(self) -> list[str]:
        met = "-" if self.met is None else ("yes" if self.met else "**no**")
        return [self.measure, self.result, self.baseline, self.ratio, self.target, met]


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x" if baseline else "-"


def render(rows: list[Row]) -> str:
    header = ["measure", "result", "baseline", "ratio", "target", "met?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; run {now}"
    )


def write(rows: list[Row], notes: list[str], seconds: float) -> None:
    text = [
        "# tenantflow benchmarks",
        "",
        f"Machine: {machine()}; the whole `make bench` took {seconds:.0f} s.",
        "",
        "Every result is set against a baseline measured in the same run on the same local",
        "stack, so the ratios compare designs rather than machines. Nothing is asserted.",
        "",
        render(rows),
        "",
    ]
    if notes:
        text += ["Notes:", "", *(f"- {note}" for note in notes), ""]
    RESULTS.write_text("\n".join(text))


def update(rows: list[Row], note: str) -> None:
    """Put `rows` into `bench/results.md` without running the whole bench: each replaces
    the row of the same measure, or is added after the table's last row; `note` says
    when and how they were measured (the other rows keep their own run)."""
    lines = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    if not any(line.startswith("| measure |") for line in lines):
        write(rows, [note], 0)
        return
    for row in rows:
        line = "| " + " | ".join(row.cells()) + " |"
        same = [i for i, old in enumerate(lines) if old.startswith(f"| {row.measure} |")]
        if same:
            lines[same[0]] = line
        else:
            last = max(i for i, old in enumerate(lines) if old.startswith("| "))
            lines.insert(last + 1, line)
    if "Notes:" not in lines:
        lines += ["Notes:", ""]
    lines.append(f"- {note}")
    RESULTS.write_text("\n".join(lines).rstrip("\n") + "\n")
