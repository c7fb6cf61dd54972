"""What users said of the answers, in MLflow: feedback aggregated by zone, target, prompt variant, routing
strategy and data class (counts and scores, never a comment's words), one run per keel_feedback DAG run.

- Experiment `keel-feedback`. A run is tagged with the Airflow dag and run ids and found again by them,
  so a retried (or cleared) task logs into the run its first try made instead of starting a second one:
  its metrics get newer values, its artifacts are replaced.
- Metrics: the totals (`n`, `mean_score`, `up`, `down`, `comments`, `corrections`) and the same per group
  as `<dimension>.<value>.<stat>` (`target.smollm2-135m-cpu.mean_score`, `prompt.keel-rag_1.n`), plus what
  the run's retention deleted (`expired.<zone>.<what>`).
- Artifacts: `feedback/groups.json` (the table of every group, columns and rows) and `feedback/scores.png` (mean score
  and count per group, one panel per dimension).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from keel.feedback.dataset import variant

EXPERIMENT = "keel-feedback"
DIMENSIONS = ("zone", "target", "prompt", "strategy", "data_class")
STATS = ("n", "mean_score", "up", "down", "comments", "corrections")


@dataclass(frozen=True)
class Group:
    """The feedback of one value of one dimension (dimension "all": every feedback row)."""

    dimension: str
    value: str
    n: int
    mean_score: float
    up: int
    down: int
    comments: int
    corrections: int


def without_text(row: Mapping[str, Any], zone: str) -> dict[str, Any]:
    """A feedback row (ZoneStore.feedback) as the report needs it: whether it has a comment or a
    correction, never their words, which stay in the zone."""
    return {**{k: row.get(k) for k in ("score", "rating", "target", "prompt", "prompt_version", "strategy",
                                        "data_class")},
            "zone": zone, "comment": bool((row.get("comment") or "").strip()),
            "correction": bool((row.get("correction") or "").strip())}


def key(row: Mapping[str, Any], dimension: str) -> str:
    """The value a row (`without_text`) has for a dimension."""
    if dimension == "prompt":
        return variant(row.get("prompt"), row.get("prompt_version"))
    return str(row.get(dimension) or "none")


def aggregate(rows: Iterable[Mapping[str, Any]]) -> list[Group]:
    """Every group of the rows: "all" first, then each dimension's values in order."""
    rows = list(rows)
    groups = [_group("all", "all", rows)]
    for d in DIMENSIONS:
        by: dict[str, list[Mapping[str, Any]]] = {}
        for r in rows:
            by.setdefault(key(r, d), []).append(r)
        groups += [_group(d, v, by[v]) for v in sorted(by)]
    return groups


def _group(dimension: str, value: str, rows: Sequence[Mapping[str, Any]]) -> Group:
    return Group(dimension, value, len(rows),
                 sum(float(r["score"]) for r in rows) / len(rows) if rows else 0.0,
                 sum(r.get("rating") == "up" for r in rows), sum(r.get("rating") == "down" for r in rows),
                 sum(bool(r.get("comment")) for r in rows), sum(bool(r.get("correction")) for r in rows))


def metrics(groups: Sequence[Group], expired: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, float]:
    """MLflow metrics of the groups (a group with no rows has no mean) and of what retention deleted."""
    out: dict[str, float] = {}
    for g in groups:
        prefix = "" if g.dimension == "all" else f"{g.dimension}.{_name(g.value)}."
        for stat in STATS:
            if stat != "mean_score" or g.n:
                out[prefix + stat] = float(getattr(g, stat))
    for zone, counts in (expired or {}).items():
        out |= {f"expired.{_name(zone)}.{k}": float(v) for k, v in counts.items()}
    return out


def _name(value: str) -> str:
    """A metric name's part: MLflow takes letters, digits, `_ - . : space` (and slashes, which nest)."""
    return re.sub(r"[^\w.\- ]", "_", value)


def figure(groups: Sequence[Group]) -> Any:
    """Mean score per group, one panel per dimension, each bar labelled with its count."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a task
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DIMENSIONS), figsize=(4 * len(DIMENSIONS), 4), squeeze=False,
                             constrained_layout=True)
    for ax, d in zip(axes.flat, DIMENSIONS, strict=True):
        shown = [g for g in groups if g.dimension == d]
        bars = ax.bar([g.value for g in shown], [g.mean_score for g in shown], color="#4c72b0")
        ax.bar_label(bars, labels=[f"n={g.n}" for g in shown], fontsize=7)
        ax.set_ylim(0, 1.1)
        ax.set_title(f"by {d}")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes.flat[0].set_ylabel("mean score (1 up, 0 down)")
    total = next((g for g in groups if g.dimension == "all"), None)
    fig.suptitle(f"Feedback: {total.n if total else 0} ratings, mean score {total.mean_score if total else 0:.2f}")
    return fig


def log(tracking_uri: str, dag_id: str, run_id: str, groups: Sequence[Group],
        expired: Mapping[str, Mapping[str, int]] | None = None, tags: Mapping[str, str] | None = None) -> str:
    """Log the groups into the DAG run's MLflow run (made on its first try); returns its id."""
    import time

    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, RunTag

    from keel.evaluation.runs import client as mlflow_client
    from keel.evaluation.runs import experiment_id, find_run

    c = mlflow_client(tracking_uri)
    exp = experiment_id(c, EXPERIMENT)
    identity = {"airflow_dag_id": dag_id, "airflow_run_id": run_id}
    found = find_run(c, exp, identity)
    run = found.info.run_id if found is not None else c.create_run(
        exp, run_name=f"{dag_id}/{run_id}", tags=identity).info.run_id
    now = int(time.time() * 1000)
    c.log_batch(run, metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics(groups, expired).items())],
                tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    # A table in the shape log_table writes (pandas' "split"), but replaced on a retry, where log_table appends.
    c.log_dict(run, {"columns": list(Group.__dataclass_fields__), "data": [list(asdict(g).values()) for g in groups]},
               "feedback/groups.json")
    fig = figure(groups)
    try:
        c.log_figure(run, fig, "feedback/scores.png")
    finally:
        plt.close(fig)
    c.set_terminated(run, "FINISHED")
    return str(run)

