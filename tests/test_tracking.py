"""Job summaries into MLflow (a real sqlite-backed MLflow, no server): one run per DAG run, even
when parallel tasks of that DAG run log at the same moment."""

from __future__ import annotations

import threading

from keel.orchestration.tracking import EXPERIMENT, log_summary


def test_parallel_tasks_of_one_dag_run_share_one_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    tasks = [f"ingest_{i}" for i in range(6)]
    start = threading.Barrier(len(tasks))
    ids: dict[str, str] = {}

    def task(name: str) -> None:
        start.wait()  # all at once: each searches before any has created the run
        ids[name] = log_summary(uri, "keel_ingest", "manual__1", name, {"counts": {"documents": 3}, "key": "k"})

    threads = [threading.Thread(target=task, args=(t,)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.airflow_run_id = 'manual__1'")
    assert len(runs) == 1 and set(ids.values()) == {runs[0].info.run_id}
    assert {f"{t}.counts.documents" for t in tasks} <= set(runs[0].data.metrics)
