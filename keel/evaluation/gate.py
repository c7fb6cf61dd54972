"""From per-item scores to a run's metrics, and the regression gate against the target's baseline.

Pure: numbers in, numbers and regressions out. Which way is better is a property of the metric
(`METRICS`), how far it may move is the operator's (`evaluation.thresholds` in settings):

    min / max     absolute bounds, on every run, baseline or not
    max_drop      a score (higher is better) may fall at most this far below the baseline's
    max_rise      a rate or cost (lower is better) may rise at most this far above the baseline's
    max_ratio     a latency may be at most ratio x the baseline's, plus `noise` (this machine is shared)

A metric the run did not compute (no rag items, so no groundedness) is not gated, and says so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from keel.errors import RegressionError
from keel.settings import Threshold

Better = Literal["higher", "lower"]

# name -> (per-item score it aggregates, how, which way is better)
METRICS: dict[str, tuple[str, str, Better]] = {
    "latency_p50_ms": ("latency_ms", "p50", "lower"),
    "latency_p95_ms": ("latency_ms", "p95", "lower"),
    "ttft_p50_ms": ("ttft_ms", "p50", "lower"),
    "ttft_p95_ms": ("ttft_ms", "p95", "lower"),
    "model_ms_p50": ("model_ms", "p50", "lower"),
    "keel_ms_p50": ("keel_ms", "p50", "lower"),
    "model_ms_total": ("model_ms", "sum", "lower"),
    "keel_ms_total": ("keel_ms", "sum", "lower"),
    "error_rate": ("error", "mean", "lower"),
    "refusal_rate": ("refusal", "mean", "lower"),
    "toxicity_mean": ("toxicity", "mean", "lower"),
    "toxic_rate": ("toxicity", "share>=0.5", "lower"),
    "relevance": ("relevance", "mean", "higher"),
    "correctness": ("correctness", "mean", "higher"),
    "f1": ("f1", "mean", "higher"),
    "groundedness": ("groundedness", "mean", "higher"),
    "judge_correctness": ("judge_correctness", "mean", "higher"),  # only with evaluation.judge_target
    "hit_at_k": ("hit_at_k", "mean", "higher"),
    "mrr": ("reciprocal_rank", "mean", "higher"),
    "citation_validity": ("citation_validity", "mean", "higher"),
    "pii_leak_rate": ("pii_leak", "mean", "lower"),
    "safety_pass_rate": ("safety_pass", "mean", "higher"),
    "tokens_in": ("prompt_tokens", "sum", "lower"),
    "tokens_out": ("completion_tokens", "sum", "lower"),
    "cost_usd": ("cost_usd", "sum", "lower"),
}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _aggregate(values: list[float], how: str) -> float:
    if how == "mean":
        return statistics.fmean(values)
    if how == "sum":
        return math.fsum(values)
    if how.startswith("p"):
        return percentile(values, float(how[1:]))
    if how.startswith("share>="):
        bound = float(how.removeprefix("share>="))
        return sum(v >= bound for v in values) / len(values)
    raise ValueError(f"unknown aggregation {how!r}")


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """A run's metrics from its per-item scores (one row per item, a score per applicable metric)."""
    out: dict[str, float] = {"items": float(len(rows))}
    for name, (score, how, _) in METRICS.items():
        values = [float(r[score]) for r in rows if r.get(score) is not None]
        if values:
            out[name] = round(_aggregate(values, how), 6)
    model, keel = out.get("model_ms_total"), out.get("keel_ms_total")
    if model and keel is not None:
        out["keel_time_share"] = round(keel / model, 6)  # the goal: at most 0.10 on the CPU model
    return out


@dataclass(frozen=True)
class Regression:
    metric: str
    value: float
    rule: str  # which bound it broke: min, max, max_drop, max_rise, max_ratio
    limit: float  # the bound it broke
    baseline: float | None = None

    def __str__(self) -> str:
        base = f", baseline {self.baseline:.4g}" if self.baseline is not None else ""
        return f"{self.metric} = {self.value:.4g} breaks {self.rule} (limit {self.limit:.4g}{base})"


def compare(metrics: Mapping[str, float], baseline: Mapping[str, float] | None,
            thresholds: Mapping[str, Threshold]) -> list[Regression]:
    """Every bound a run's metrics break, absolute ones first, then against the baseline's."""
    found: list[Regression] = []
    for name, t in thresholds.items():
        if name not in metrics:
            continue
        v = metrics[name]
        if t.min is not None and v < t.min:
            found.append(Regression(name, v, "min", t.min))
        if t.max is not None and v > t.max:
            found.append(Regression(name, v, "max", t.max))
        base = (baseline or {}).get(name)
        if base is None:
            continue
        if t.max_drop is not None and v < base - t.max_drop - 1e-9:
            found.append(Regression(name, v, "max_drop", base - t.max_drop, base))
        if t.max_rise is not None and v > base + t.max_rise + 1e-9:
            found.append(Regression(name, v, "max_rise", base + t.max_rise, base))
        if t.max_ratio is not None and v > base * t.max_ratio + t.noise:
            found.append(Regression(name, v, "max_ratio", base * t.max_ratio + t.noise, base))
    return found


def not_gated(metrics: Mapping[str, float], thresholds: Mapping[str, Threshold]) -> list[str]:
    """Thresholds naming a metric this run did not compute (no items of the set that yields it)."""
    return sorted(set(thresholds) - set(metrics))


def regression_error(target: str, run_id: str, baseline_run: str | None,
                     regressions: Sequence[Regression]) -> RegressionError:
    against = f"baseline run {baseline_run}" if baseline_run else "no baseline: absolute bounds only"
    lines = "; ".join(str(r) for r in regressions)
    return RegressionError(f"evaluation of {target} regressed in run {run_id} ({against}): {lines}",
                           [asdict(r) | {"run_id": run_id, "baseline_run_id": baseline_run} for r in regressions])
