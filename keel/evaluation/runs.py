"""Evaluation runs in MLflow: the experiment, the golden sets as evaluation datasets, one run per DAG
run and target, and the baseline a person promotes.

- Experiment `keel-evaluation`. A run is tagged with the Airflow dag and run ids, the target, the
  serving config's hash and each golden set's version; it is found again by those tags, so a retried
  task reuses its run instead of starting a second one.
- A golden set version is an MLflow evaluation dataset of its own, `keel-golden-<set>-<version>`,
  written once (OSS MLflow has no dataset versions; a new file content is a new dataset), and every
  run that used it lists it among its inputs.
- The baseline of a target is the run tagged `baseline=true`, one per target and scope (the golden sets
  and the sample size it asked): a run is gated only against one that asked the same, so a full-set run
  on demand is never compared with the daily sample's. Promoting a run takes the tag from the one before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keel.evaluation.golden import GoldenItem, GoldenSet

EXPERIMENT = "keel-evaluation"
BASELINE_TAG = "baseline"
COMPLETE_TAG = "keel.complete"  # the evaluation's results are all logged (gate passed or not)


def client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def experiment_id(c: Any, name: str = EXPERIMENT) -> str:
    """The experiment's id (keel-evaluation, or another of Keel's: keel-feedback), created on first use."""
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(c.create_experiment(name, tags={"keel": name.removeprefix("keel-")}))
    except MlflowException:  # created meanwhile by another task
        return str(c.get_experiment_by_name(name).experiment_id)


def record(item: GoldenItem, set_name: str) -> dict[str, Any]:
    """A golden item as an MLflow evaluation record: what is sent, and what a good answer holds."""
    return {
        "inputs": {"question": item.question, "set": set_name, "id": item.id,
                   "data_class": item.data_class.value if item.data_class else None},
        # MLflow stores each expectation as an assessment and refuses one without a value: absent ones stay out.
        "expectations": {k: v for k, v in {"reference": item.reference, "sources": list(item.sources),
                                            "expected": item.expected, "pii": list(item.pii)}.items() if v},
    }


def dataset_name(gs: GoldenSet) -> str:
    return f"keel-golden-{gs.name}-{gs.version}"


def register(tracking_uri: str, sets: Sequence[GoldenSet]) -> list[Any]:
    """Each golden set version as an MLflow evaluation dataset (made once), linked to the experiment."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.genai import datasets

    mlflow.set_tracking_uri(tracking_uri)
    exp = experiment_id(client(tracking_uri))
    out = []
    for gs in sets:
        try:
            out.append(datasets.get_dataset(name=dataset_name(gs)))
            continue
        except MlflowException:
            pass
        ds = datasets.create_dataset(name=dataset_name(gs), experiment_id=exp,
                                     tags={"set": gs.name, "version": gs.version, "items": str(len(gs.items))})
        ds.merge_records([record(it, gs.name) for it in gs.items])
        out.append(ds)
    return out


def find_run(c: Any, exp: str, tags: dict[str, str]) -> Any | None:
    """The run with these tags (the DAG run's, for one target), newest first; None when there is none."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in sorted(tags.items()))
    found = c.search_runs([exp], filter_string=where, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


SCOPE_TAGS = ("sets", "sample_size")  # what a run asked: only runs that asked the same are compared


def scope_of(run: Any) -> dict[str, str]:
    return {k: run.data.tags[k] for k in SCOPE_TAGS if k in run.data.tags}


def baseline(c: Any, exp: str, target: str, scope: dict[str, str]) -> Any | None:
    return find_run(c, exp, {"target": target, BASELINE_TAG: "true", **scope})


def latest(c: Any, exp: str, target: str) -> Any | None:
    """The newest run of a target whose evaluation was completed (whatever its gate said)."""
    return find_run(c, exp, {"target": target, COMPLETE_TAG: "true"})


def promote(tracking_uri: str, run_id: str) -> tuple[Any, Any | None]:
    """Make a completed run its target's baseline; returns (the run, the baseline it replaced or None)."""
    from keel.errors import NotFoundError

    c = client(tracking_uri)
    run = c.get_run(run_id)
    exp = experiment_id(c)
    target = run.data.tags.get("target")
    if run.info.experiment_id != exp or not target:
        raise NotFoundError(f"run {run_id} is not an evaluation run of experiment {EXPERIMENT}")
    if run.data.tags.get(COMPLETE_TAG) != "true":
        raise NotFoundError(f"run {run_id} did not complete its evaluation: it cannot be a baseline")
    before = baseline(c, exp, target, scope_of(run))
    c.set_tag(run_id, BASELINE_TAG, "true")
    if before is not None and before.info.run_id != run_id:
        c.delete_tag(before.info.run_id, BASELINE_TAG)
        c.set_tag(before.info.run_id, "baseline_until", run_id)
    return run, before


def comparison(latest_run: Any, baseline_run: Any | None,
               thresholds: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (metric, baseline, latest, verdict) for `keel eval show`: every metric the latest run logged."""
    from keel.evaluation import gate

    new = dict(latest_run.data.metrics)
    base = dict(baseline_run.data.metrics) if baseline_run is not None else None
    broken: dict[str, list[str]] = {}
    for r in gate.compare(new, base, thresholds):
        broken.setdefault(r.metric, []).append(f"{r.rule} {r.limit:.4g}")
    rows: list[tuple[str, str, str, str]] = []
    for name in sorted(new):
        b = f"{base[name]:.4g}" if base and name in base else "-"
        verdict = ("REGRESSED (" + ", ".join(broken[name]) + ")") if name in broken else (
            "ok" if name in thresholds else "")
        rows.append((str(name), b, f"{new[name]:.4g}", verdict))
    return rows
