"""What every benchmark script shares: percentiles in milliseconds and writing its JSON report."""

from __future__ import annotations

import json
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


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
