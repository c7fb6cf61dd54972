"""Drift: whether a target's recent evaluation items are distributed like its baseline's.

Pure: per-item rows in (what keel.evaluation.evaluate's `item_rows` produces), numbers out. Compared
per distribution: the prompt's and the answer's length in characters, and every per-item score the
gate aggregates (gate.METRICS: latency_ms, relevance, groundedness, toxicity, ...).

- Population stability index, PSI = sum over bins of (w - b) * ln(w / b), where b and w are the
  baseline's and the window's shares of items in a bin. The bins are cut at the baseline's quantiles
  (k equal-mass bins, k = n_baseline // 10 between 2 and 10, so each bin holds about ten baseline items
  or more and a small baseline is not called drifted by its own noise); a cut repeated by tied values
  is kept once, each bin is (cut_i, cut_i+1], the outer ones open. An empty bin counts as EPSILON.
- The two-sample Kolmogorov-Smirnov statistic and p-value (scipy's ks_2samp, exact for small samples).

A distribution has drifted when its PSI exceeds `drift_psi` (0.2) and the KS test rejects "same
distribution" at `drift_ks_p` (0.05): PSI alone raised a false alarm on 20.5% of unchanged
distributions with the daily sample's 9 baseline items, both together on 1.8% (400 seeded draws of
one law on both sides, a window 7x the baseline), while still catching a 1.65x median shift 60% of the time at
9 items (89-100% with PSI alone). One with fewer than MIN_ITEMS values on either side is "not
compared", with its reason.

The window (chosen by evaluate): the items of the run being logged and of the target's other completed
runs started in the last `drift_window_days` days; the baseline: the items of the target's baseline run,
which the window leaves out. Drift informs and alerts; it never fails a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from keel.evaluation import gate

MIN_ITEMS = 5
MAX_WINDOW_RUNS = 50  # the newest runs of the window at most: a daily run and some by hand fill a week with far fewer
MAX_BINS = 10
EPSILON = 1e-4  # the share an empty bin counts as: ln(0) is undefined
NO_BASELINE = "no baseline"
NOT_COMPARED = "not compared"  # the tag when no distribution had enough items on both sides

LENGTHS = ("prompt_chars", "answer_chars")  # item_rows adds them: the answer in its row is cut at 500 characters
DISTRIBUTIONS: tuple[str, ...] = (*LENGTHS, *dict.fromkeys(score for score, _, _ in gate.METRICS.values()))


@dataclass(frozen=True)
class Distribution:
    """One distribution, baseline against window: compared (psi and ks set) or not, and why not."""

    name: str
    n_baseline: int
    n_window: int
    psi: float | None = None
    ks_statistic: float | None = None
    ks_p: float | None = None
    bins: int = 0
    drifted: bool = False
    reason: str | None = None  # why it was not compared

    @property
    def compared(self) -> bool:
        return self.psi is not None


@dataclass(frozen=True)
class Report:
    """Every distribution of one run's window against its target's baseline."""

    psi_limit: float
    distributions: list[Distribution]
    baseline_run_id: str | None = None
    window_run_ids: list[str] = field(default_factory=list)
    window_days: int | None = None

    @property
    def drifted(self) -> list[str]:
        return [d.name for d in self.distributions if d.drifted]

    @property
    def tag(self) -> str:
        """The run's `drift` tag: the drifted names, "none", or NOT_COMPARED when nothing could be."""
        if not any(d.compared for d in self.distributions):
            return NOT_COMPARED
        return ",".join(self.drifted) or "none"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.tag, "drifted": self.drifted, "psi_limit": self.psi_limit,
                "method": {"psi_bins": "baseline quantiles, k = n_baseline // 10 in [2, 10]", "epsilon": EPSILON,
                           "ks": "scipy.stats.ks_2samp", "min_items": MIN_ITEMS},
                "baseline_run_id": self.baseline_run_id, "window_run_ids": self.window_run_ids,
                "window_days": self.window_days, "distributions": [asdict(d) for d in self.distributions]}


def values(rows: Sequence[Mapping[str, Any]], name: str) -> list[float]:
    """The finite numbers under `name` (a boolean score counts 0 or 1); absent, None, NaN and text are left out."""
    out = []
    for r in rows:
        v = r.get(name)
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, int | float) and math.isfinite(v):
            out.append(float(v))
    return out


def bin_count(n_baseline: int) -> int:
    return max(2, min(MAX_BINS, n_baseline // 10))


def cuts(baseline: Sequence[float], bins: int) -> list[float]:
    """The inner bin edges: the baseline's quantiles at 1/bins, 2/bins, ..., each once."""
    import numpy as np

    qs = np.quantile(np.asarray(baseline, dtype=float), [i / bins for i in range(1, bins)])
    return sorted({float(q) for q in qs})


def shares(xs: Sequence[float], edges: Sequence[float]) -> list[float]:
    """The share of `xs` in each bin (-inf, e0], (e0, e1], ..., (e_last, inf), an empty one as EPSILON."""
    import numpy as np

    counts = np.bincount(np.searchsorted(np.asarray(edges), np.asarray(xs, dtype=float), side="left"),
                         minlength=len(edges) + 1)
    return [max(int(c) / len(xs), EPSILON) for c in counts]


def psi(baseline: Sequence[float], window: Sequence[float], bins: int | None = None) -> float:
    """Population stability index of `window` against `baseline`, binned at the baseline's quantiles."""
    edges = cuts(baseline, bins or bin_count(len(baseline)))
    b, w = shares(baseline, edges), shares(window, edges)
    return math.fsum((wi - bi) * math.log(wi / bi) for bi, wi in zip(b, w, strict=True))


def ks(baseline: Sequence[float], window: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (statistic, p-value)."""
    from scipy.stats import ks_2samp  # type: ignore[import-untyped]

    result = ks_2samp(baseline, window)
    return float(result.statistic), float(result.pvalue)


def compare_one(name: str, baseline: Sequence[float], window: Sequence[float], psi_limit: float,
                ks_p_limit: float = 0.05, min_items: int = MIN_ITEMS) -> Distribution:
    nb, nw = len(baseline), len(window)
    if nb < min_items or nw < min_items:
        return Distribution(name, nb, nw, reason=f"too few items: {nb} in the baseline, {nw} in the window "
                                                 f"(at least {min_items} on each side)")
    k = bin_count(nb)
    p = psi(baseline, window, k)
    stat, pvalue = ks(baseline, window)
    drifted = p > psi_limit and pvalue < ks_p_limit
    return Distribution(name, nb, nw, round(p, 6), round(stat, 6), round(pvalue, 6), k, drifted)


def compare(baseline_rows: Sequence[Mapping[str, Any]], window_rows: Sequence[Mapping[str, Any]],
            psi_limit: float, ks_p_limit: float = 0.05, min_items: int = MIN_ITEMS) -> list[Distribution]:
    """Every distribution with values on either side (one absent from both was not measured at all)."""
    out = []
    for name in DISTRIBUTIONS:
        b, w = values(baseline_rows, name), values(window_rows, name)
        if b or w:
            out.append(compare_one(name, b, w, psi_limit, ks_p_limit, min_items))
    return out
