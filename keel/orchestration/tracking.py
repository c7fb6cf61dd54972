"""Job run summaries into MLflow: one MLflow run per Airflow DAG run, tagged with its dag_id and run_id.

Each task adds its stage's numbers under its own prefix (counts, findings by type, durations) and
its whole summary as a JSON artifact. Finding the run by tags (not by remembering its id) keeps
task retries and later tasks of the same DAG run on the one MLflow run.
"""

from __future__ import annotations

import json
import time
from typing import Any

EXPERIMENT = "keel-pipeline"


def numeric_metrics(summary: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for section in ("counts", "findings", "durations", "changes"):
        for k, v in (summary.get(section) or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{prefix}.{section}.{k}"] = float(v)
    for k in ("documents", "files"):
        if isinstance(summary.get(k), int):
            out[f"{prefix}.{k}"] = float(summary[k])
    return out


def log_summary(tracking_uri: str, dag_id: str, run_id: str, task_id: str, summary: dict[str, Any]) -> str:
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.airflow_dag_id = '{dag_id}' and tags.airflow_run_id = '{run_id}'", max_results=1
    )
    run = found[0] if found else _create_once(client, exp_id, dag_id, run_id)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in sorted(numeric_metrics(summary, task_id).items())]
    tags = [RunTag(f"{task_id}.key", str(summary.get("key", ""))),
            RunTag(f"{task_id}.skipped", str(bool(summary.get("skipped"))).lower())]
    client.log_batch(run.info.run_id, metrics=metrics, tags=tags)
    client.log_text(run.info.run_id, json.dumps({k: v for k, v in summary.items() if k != "manifest"}, indent=2,
                                                sort_keys=True), f"summaries/{task_id}.json")
    return str(run.info.run_id)


def _create_once(client: Any, exp_id: str, dag_id: str, run_id: str, wait_s: float = 30.0) -> Any:
    """The DAG run's MLflow run, created by exactly one of the tasks that found none (parallel tasks such
    as ingest_us and ingest_eu both do). MLflow's one atomic check is a unique experiment name: the
    task that creates the lock experiment creates the run and names it there; the others read it."""
    from mlflow.exceptions import MlflowException

    lock = f"{EXPERIMENT}/lock/{dag_id}/{run_id}"
    try:
        lock_id = client.create_experiment(lock)
    except MlflowException:  # another task holds the lock: wait for the run it creates
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            held = client.get_experiment_by_name(lock)  # found deleted too: its tag outlives the deletion
            if held is not None and (named := held.tags.get("run_id")):
                return client.get_run(named)
            time.sleep(0.2)
        lock_id = None  # its holder died before naming the run: a second run beats losing this one's numbers
    run = client.create_run(exp_id, run_name=f"{dag_id}/{run_id}",
                            tags={"airflow_dag_id": dag_id, "airflow_run_id": run_id})
    if lock_id is not None:
        client.set_experiment_tag(lock_id, "run_id", run.info.run_id)
        client.delete_experiment(lock_id)  # out of the UI's list; a deleted experiment keeps its name taken
    return run
