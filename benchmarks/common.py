"""What every benchmark script shares: percentiles in milliseconds, CPU time of a process tree, and
writing its JSON report."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def ms(x: float) -> float:
    return round(x * 1000, 2)


def latency(xs: list[float]) -> dict[str, float]:
    """Median and p99 of samples in seconds, in milliseconds."""
    return {"p50_ms": ms(statistics.median(xs)), "p99_ms": ms(pct(xs, 99)), "n": len(xs)}


def cpu_seconds(root_pid: int) -> float:
    """CPU time (user + system) of a live process and its live descendants, from /proc (Linux): what a
    service such as MLflow's server spent, read before and after a run."""
    clock, parents, used = os.sysconf("SC_CLK_TCK"), {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the command's name, which may hold spaces
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / clock  # utime, stime
    tree, grew = {root_pid}, True
    while grew:
        grown = tree | {pid for pid, parent in parents.items() if parent in tree}
        grew, tree = grown != tree, grown
    return sum(used.get(pid, 0.0) for pid in tree)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
