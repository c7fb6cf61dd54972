"""The batch pipeline's MLflow runs, on a real MLflow (a sqlite store; one test against a real
`mlflow server`): one run per DAG run even when parallel tasks log at the same moment, nothing left
behind by its creation, a run that ends when its tasks end (FINISHED, or FAILED with the reason),
and a skipped stage that reports only that it skipped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from keel.errors import FailureKind
from keel.orchestration import chain
from keel.orchestration.ray_jobs import RayJobError
from keel.orchestration.tracking import EXPERIMENT, fail_task, failure_reason, log_summary, start_task

# How a failed Ray job's error reads: Ray's first line, the job's log, the exception it ended with.
JOB_FAILED = RayJobError(
    "Ray job keel-validate_us-0123-try1 FAILED: Job entrypoint command failed with exit code 1\n"
    "Traceback (most recent call last):\n  File \"ray_jobs/validate.py\", line 52, in run\n"
    "keel.errors.DataQualityError: zone us: scrubbed snapshot s1 failed validation: ['doc_count']\n"
    "(ray) shutting down", FailureKind.DATA_QUALITY)
REASON = ("[data_quality] Ray job keel-validate_us-0123-try1 FAILED: Job entrypoint command failed with exit code 1"
          " ... keel.errors.DataQualityError: zone us: scrubbed snapshot s1 failed validation: ['doc_count']")


@pytest.fixture
def mlflow_uri(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    return uri


def dag_run(uri: str, run_id: str) -> object:
    """The DAG run's MLflow runs: exactly one, deleted ones included (none may be left behind)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"tags.airflow_run_id = '{run_id}'", run_view_type=ViewType.ALL)
    assert len(runs) == 1, [r.info for r in runs]
    return runs[0]


def nothing_left_behind(uri: str) -> None:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    assert {e.name for e in client.search_experiments(view_type=ViewType.ALL)} == {"Default", EXPERIMENT}
    assert client.search_registered_models() == []


def all_at_once(tasks: list[str], body: Callable[[str], str]) -> dict[str, str]:
    """`body(task)` in one thread per task, started together: each looks for the run before any made it."""
    start = threading.Barrier(len(tasks))
    ids: dict[str, str] = {}
    errors: list[Exception] = []

    def task(name: str) -> None:
        start.wait()
        try:
            ids[name] = body(name)
        except Exception as e:  # noqa: BLE001 - a thread's error would be lost: the test reports it
            errors.append(e)

    threads = [threading.Thread(target=task, args=(t,)) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return ids


def parallel_tasks_share_one_run_that_ends(uri: str) -> None:
    tasks = [f"ingest_{i}" for i in range(6)]
    ids = all_at_once(tasks, lambda t: start_task(uri, "keel_ingest", "manual__1", t))
    ids |= all_at_once(tasks, lambda t: log_summary(uri, "keel_ingest", "manual__1", t,
                                                    {"counts": {"documents": 3}, "key": "k"}))
    run = dag_run(uri, "manual__1")
    assert set(ids.values()) == {run.info.run_id} and run.info.lifecycle_stage == "active"
    assert {f"{t}.counts.documents" for t in tasks} <= set(run.data.metrics)
    assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time
    assert {run.data.tags[f"{t}.state"] for t in tasks} == {"finished"}
    nothing_left_behind(uri)


def test_parallel_tasks_of_one_dag_run_share_one_run_and_leave_nothing_behind(mlflow_uri):
    parallel_tasks_share_one_run_that_ends(mlflow_uri)


def test_a_run_is_running_while_a_task_runs_and_ends_with_the_last(mlflow_uri):
    uri, done = mlflow_uri, {"counts": {"documents": 3}, "key": "k"}

    def status(run_id: str) -> tuple[str, bool]:
        run = dag_run(uri, run_id)
        return run.info.status, run.info.end_time is not None

    start_task(uri, "keel_ingest", "scheduled__1", "ingest_us")
    start_task(uri, "keel_ingest", "scheduled__1", "ingest_eu")
    assert status("scheduled__1") == ("RUNNING", False)
    log_summary(uri, "keel_ingest", "scheduled__1", "ingest_us", done)
    assert status("scheduled__1") == ("RUNNING", False)  # ingest_eu still runs
    log_summary(uri, "keel_ingest", "scheduled__1", "ingest_eu", done)
    assert status("scheduled__1") == ("FINISHED", True)
    # Two stages in sequence (keel_scrub_<zone>: scrub, then validate): running again while validate runs.
    start_task(uri, "keel_scrub_us", "asset_triggered__1", "scrub_us")
    log_summary(uri, "keel_scrub_us", "asset_triggered__1", "scrub_us", done)
    first_end = dag_run(uri, "asset_triggered__1").info.end_time
    start_task(uri, "keel_scrub_us", "asset_triggered__1", "validate_us")
    assert status("asset_triggered__1")[0] == "RUNNING"
    log_summary(uri, "keel_scrub_us", "asset_triggered__1", "validate_us", done)
    run = dag_run(uri, "asset_triggered__1")
    assert run.info.status == "FINISHED" and run.info.end_time >= first_end


def test_a_failed_task_fails_the_run_with_its_reason_and_a_successful_retry_finishes_it(mlflow_uri):
    uri = mlflow_uri
    for task in ("scrub_us", "validate_us"):
        start_task(uri, "keel_scrub_us", "r1", task)
    fail_task(uri, "keel_scrub_us", "r1", "validate_us", JOB_FAILED)
    run = dag_run(uri, "r1")
    assert run.info.status == "RUNNING"  # scrub_us still runs: the DAG run has not ended
    assert run.data.tags["failure"] == run.data.tags["validate_us.failure"] == REASON
    log_summary(uri, "keel_scrub_us", "r1", "scrub_us", {"counts": {"out": 3}, "key": "s1"})
    run = dag_run(uri, "r1")
    assert (run.info.status, run.data.tags["failure"]) == ("FAILED", REASON) and run.info.end_time
    # A retry of the failed task: running again, then finished, with no failure left on the run.
    start_task(uri, "keel_scrub_us", "r1", "validate_us")
    run = dag_run(uri, "r1")
    assert run.info.status == "RUNNING" and "failure" not in run.data.tags
    log_summary(uri, "keel_scrub_us", "r1", "validate_us", {"counts": {"checks": 4}, "key": "v1"})
    run = dag_run(uri, "r1")
    assert run.info.status == "FINISHED" and not {k for k in run.data.tags if k.endswith("failure")}


def test_a_lock_left_by_a_task_that_died_holding_it_is_broken(mlflow_uri, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    from keel.orchestration import tracking

    monkeypatch.setattr(tracking, "LOCK_WAIT_S", 0.5)
    MlflowClient(mlflow_uri, registry_uri=mlflow_uri).create_registered_model(
        tracking.creation_lock("keel_ingest", "r1"))  # taken, and its holder never created the run
    with caplog.at_level(logging.WARNING, logger="keel.orchestration"):
        run = start_task(mlflow_uri, "keel_ingest", "r1", "ingest_us")
    assert dag_run(mlflow_uri, "r1").info.run_id == run
    assert any("breaking the MLflow run lock" in r.getMessage() for r in caplog.records)
    nothing_left_behind(mlflow_uri)


def test_a_failure_reason_is_one_line_with_its_kind():
    assert failure_reason(JOB_FAILED) == REASON
    assert failure_reason(TimeoutError("read timed out\nsecond line")) == "[transient] TimeoutError: read timed out"
    assert failure_reason(KeyError("documents")) == "[bug] KeyError: 'documents'"
    assert len(failure_reason(RayJobError("x" * 5000, FailureKind.BUG))) == 500


def test_a_skipped_stage_logs_that_it_skipped_and_no_counts(mlflow_uri, tmp_path):
    """Real job summaries: the eu landing (under 64 files: no Ray needed) ingested, then again unchanged."""
    from mlflow.tracking import MlflowClient

    from ray_jobs import ingest
    from tests.support.services import write_config

    cfg = str(write_config(tmp_path / "keel"))
    ran = ingest.run("eu", "2026-11-26T00:00:00+00:00", cfg)
    skipped = ingest.run("eu", "2026-11-27T00:00:00+00:00", cfg)
    assert skipped["skipped"] and skipped["documents"] == ran["documents"] and skipped["durations"]
    log_summary(mlflow_uri, "keel_ingest", "scheduled__1", "ingest_eu", ran)
    log_summary(mlflow_uri, "keel_ingest", "scheduled__2", "ingest_eu", skipped)
    first, second = dag_run(mlflow_uri, "scheduled__1"), dag_run(mlflow_uri, "scheduled__2")
    assert first.data.metrics["ingest_eu.documents"] == ran["documents"] > 0
    assert first.data.tags["ingest_eu.skipped"] == "false"
    assert second.data.metrics == {}  # not the counts or durations of the run that committed
    assert {k: v for k, v in second.data.tags.items() if k.startswith("ingest_eu.")} == {
        "ingest_eu.skipped": "true", "ingest_eu.key": ran["key"], "ingest_eu.state": "skipped"}
    assert MlflowClient(mlflow_uri).list_artifacts(second.info.run_id) == []
    assert second.info.status == "FINISHED"


def test_an_mlflow_outage_does_not_hide_a_task_failure(monkeypatch, caplog):
    from keel.processes import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # its default backs off for about a minute
    down = f"http://127.0.0.1:{free_port()}"  # a tracking server that is not there
    with caplog.at_level(logging.WARNING, logger="keel.orchestration"):
        fail_task(down, "keel_ingest", "r1", "ingest_us", JOB_FAILED)  # returns: the caller raises its own error
    assert any("could not record the failure of ingest_us" in r.getMessage() for r in caplog.records)


def test_a_stage_task_records_its_run_and_its_failure(mlflow_uri, monkeypatch):
    """The task body (keel.orchestration.stages.run_stage) with a stand-in for the Ray job: the MLflow
    run is RUNNING while the job runs, and FAILED with the job's reason when it fails."""
    from airflow.sdk.exceptions import AirflowFailException

    from keel.orchestration import ray_jobs, stages
    from keel.settings import get_settings

    monkeypatch.setenv("KEEL_PIPELINE__MLFLOW_TRACKING_URI", mlflow_uri)
    get_settings.cache_clear()
    seen: list[str] = []

    def job(address: str, entrypoint: list[str], **kw: object) -> dict:
        seen.append(dag_run(mlflow_uri, "r1").info.status)
        if "ray_jobs.validate" in entrypoint:
            raise JOB_FAILED
        return {"stage": "scrubbed", "key": "s1", "counts": {"out": 3}, "manifest": {}}

    monkeypatch.setattr(ray_jobs, "run_job", job)
    try:
        for name in ("scrub", "validate"):
            ti = SimpleNamespace(dag_id="keel_scrub_us", task_id=f"{name}_us", run_id="r1", try_number=1)
            context = {"ti": ti, "outlet_events": {}, "triggering_asset_events": {}}
            if name == "scrub":
                stages.run_stage(chain.stage(name), "us", context, None, None, None)
                continue
            with pytest.raises(AirflowFailException, match=r"^\[data_quality\] Ray job"):
                stages.run_stage(chain.stage(name), "us", context, {"key": "s1"}, None, None)
    finally:
        get_settings.cache_clear()
    run = dag_run(mlflow_uri, "r1")
    assert seen == ["RUNNING", "RUNNING"]
    assert run.info.status == "FAILED" and run.data.tags["failure"] == REASON
    assert run.data.metrics["scrub_us.counts.out"] == 3


def test_against_a_real_mlflow_server(tmp_path):
    """The same race through the REST API of a real `mlflow server`, the way Airflow tasks reach it."""
    from tests.support.services import start_mlflow

    server, url = start_mlflow(tmp_path / "mlflow")
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(url).create_experiment(EXPERIMENT)
        parallel_tasks_share_one_run_that_ends(url)
        start_task(url, "keel_scrub_us", "r1", "validate_us")
        fail_task(url, "keel_scrub_us", "r1", "validate_us", JOB_FAILED)
        run = dag_run(url, "r1")
        assert (run.info.status, run.data.tags["failure"]) == ("FAILED", REASON)
    finally:
        server.stop()
