"""The figures an evaluation run logs for a person reading it in the MLflow UI (Artifacts, eval/*.png):
score distributions, where each answer's time went (model vs Keel), and the run against its baseline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SCORES = ("relevance", "correctness", "f1", "groundedness", "toxicity", "reciprocal_rank")
COMPARED = ("error_rate", "toxic_rate", "relevance", "correctness", "f1", "groundedness", "hit_at_k", "mrr",
            "citation_validity", "pii_leak_rate", "safety_pass_rate", "latency_p50_ms", "ttft_p50_ms")


def figures(rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, float],
            baseline: Mapping[str, float] | None) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")  # no display in a job
    out = {"scores": _scores(rows), "latency": _latency(rows)}
    if baseline:
        out["vs_baseline"] = _versus(metrics, baseline)
    return out


def _scores(rows: Sequence[Mapping[str, Any]]) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6), constrained_layout=True)
    for ax, name in zip(axes.flat, SCORES, strict=True):
        values = [float(r[name]) for r in rows if isinstance(r.get(name), int | float)]
        ax.hist(values, bins=10, range=(0, 1), color="#4c72b0")
        ax.set_title(f"{name} (n={len(values)})")
    fig.suptitle("Score distributions")
    return fig


def _latency(rows: Sequence[Mapping[str, Any]]) -> Any:
    import matplotlib.pyplot as plt

    ids = [str(r["id"]) for r in rows]
    model = [float(r.get("model_ms") or 0) / 1000 for r in rows]
    keel = [float(r.get("keel_ms") or 0) / 1000 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(ids) * 0.25), 4), constrained_layout=True)
    ax.bar(ids, model, label="model", color="#4c72b0")
    ax.bar(ids, keel, bottom=model, label="Keel (everything else)", color="#dd8452")
    ax.set_ylabel("seconds")
    ax.set_title("Time per answer")
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.legend()
    return fig


def _versus(metrics: Mapping[str, float], baseline: Mapping[str, float]) -> Any:
    import matplotlib.pyplot as plt

    names = [n for n in COMPARED if n in metrics and n in baseline]
    fig, ax = plt.subplots(figsize=(10, 4), constrained_layout=True)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [baseline[n] for n in names], width=0.4, label="baseline", color="#999999")
    ax.bar([i + 0.2 for i in x], [metrics[n] for n in names], width=0.4, label="this run", color="#4c72b0")
    ax.set_xticks(list(x), names, rotation=45, ha="right")
    ax.set_yscale("symlog")
    ax.set_title("This run against the baseline")
    ax.legend()
    return fig


def drift(baseline_rows: Sequence[Mapping[str, Any]], window_rows: Sequence[Mapping[str, Any]],
          compared: Sequence[Any]) -> Any:
    """Baseline against the last window, one empirical CDF pair per compared distribution
    (keel.evaluation.drift.Distribution): CDFs share one axis whatever the scale, and show a shift plainly.
    Fixed spacing and one legend: constrained layout and a legend per panel took 3x as long to draw."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a job
    import matplotlib.pyplot as plt

    from keel.evaluation.drift import values

    cols = min(4, max(1, len(compared)))
    rows = max(1, -(-len(compared) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows + 0.8), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=1 - 0.8 / (2.4 * rows + 0.8), hspace=0.55,
                        wspace=0.3)
    for ax in axes.flat[len(compared):]:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, compared, strict=False):
        for label, data, color in (("baseline", baseline_rows, "#999999"), ("last window", window_rows, "#4c72b0")):
            xs = sorted(values(data, d.name))  # compared: at least drift.MIN_ITEMS values
            ax.step([xs[0], *xs], [0, *((i + 1) / len(xs) for i in range(len(xs)))], where="post", label=label,
                    color=color)
        ax.set_title(f"{d.name} (n {d.n_baseline}/{d.n_window}): PSI {d.psi:.3g}{' DRIFTED' if d.drifted else ''}",
                     fontsize=8, color="#c44e52" if d.drifted else "black")
        ax.tick_params(labelsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("Drift: baseline against the last window (empirical CDFs)", x=0.06, ha="left")
    return fig
