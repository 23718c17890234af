"""Helpers shared by the benchmarks: progress lines, machine description and load, percentiles, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_T0 = time.monotonic()


def say(message: str) -> None:
    """Progress on stdout, stamped with seconds since start."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded: how busy the (shared) machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor(),
            "python": sys.version.split()[0]}  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def write_json(name: str, report: dict[str, Any], out: Path | None = None) -> Path:
    """Write a report to bench/results/NAME.json (or `out`) and return the path."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def write_report(name: str, report: dict[str, Any], text: str, out: Path | None = None) -> Path:
    """Print a bench's table, write the report (write_json) with the table as a .txt beside it, and say where;
    returns the JSON's path."""
    print("\n" + text)
    path = write_json(name, report, out)
    path.with_suffix(".txt").write_text(text + "\n")
    say(f"wrote {path} and {path.with_suffix('.txt')}")
    return path


Series = tuple[str, Callable[[dict[str, Any]], float]]  # a y-axis label, and its value from one window


def plot_windows(report: dict[str, Any], path: Path, top: Series, bottom: Series, line: float | None = None) -> None:
    """Two panels over the windows of each run in `report["runs"]` (by `upto`); `line`: a dashed level on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for run in report["runs"]:
        x = [w["upto"] for w in run["windows"]]
        for axis, (_, value) in zip(axes, (top, bottom), strict=True):
            axis.plot(x, [value(w) for w in run["windows"]], marker="o", label=run["mode"])
    if line is not None:
        axes[0].axhline(line, color="grey", linestyle="--", label="target")
    for axis, (label, _) in zip(axes, (top, bottom), strict=True):
        axis.set_ylabel(label)
    axes[1].set_xlabel("requests")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
