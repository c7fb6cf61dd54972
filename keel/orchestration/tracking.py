"""The batch pipeline in MLflow: one MLflow run per Airflow DAG run, in experiment `keel-pipeline`,
tagged with its dag_id and run_id, and found again by those tags, so retries and later tasks of the
same DAG run (scrub then validate; one task per zone, in parallel) all log into the one run.

What each task logs:
- when it starts, `<task>.state = running`;
- when its job produced a snapshot, its numbers under its own prefix (counts, findings by type,
  durations) and its whole summary as the artifact `summaries/<task>.json`; `<task>.state = finished`;
- when its job found its output already committed, only that: `<task>.skipped = true` and the key it
  found, `<task>.state = skipped`. The summary of such a job (ray_jobs._job `StageRun.skip`) repeats
  the counts of the run that committed, and its durations time only the look-up: logged as this
  run's numbers, they would claim work it did not do;
- when it fails (a timeout or a kill included), `<task>.state = failed` and `<task>.failure`, the
  reason as `[kind] message`.

The run's status follows its tasks' states, as a person browsing the MLflow UI expects:
RUNNING while any task is running; else FAILED when any task's latest try failed, with that reason
in the run tag `failure`; else FINISHED. Each task sets it after its own state, with the end time of
that moment, so the run ends when its last running task ends, and a retry that succeeds takes it
from FAILED back through RUNNING to FINISHED (and drops `failure`). No task needs to know which
tasks its DAG has: one that has not started yet is not running. (Simpler, "every task ends the run
after it logs" shows a run FINISHED while a parallel zone's task still runs.) Between two tasks in sequence the
run is FINISHED for the seconds the scheduler takes to start the next one; a task killed outright
(no exception reaches its code) stays `running` until a retry of it ends. While a later task runs,
the run keeps the end time of its last ending: MLflow cannot clear an end time.

Parallel tasks set the status at the same moment from what each read: each one re-reads after its
write and writes again until the run agrees with the tags it reads, so the last word is always
from a read that saw every task's state.

Creating the run once: parallel tasks that find no run would each create one. Agreeing on one of
several created runs (create, then keep the oldest) is not enough: a run created first can become
visible after another task has already chosen its own, and nothing in MLflow orders runs by when
they were stored (start times come from each task's clock). A unique name is MLflow's one atomic
check, so the creation takes a lock: a registered model named after the DAG run (experiment names
would do too, but a deleted experiment keeps its name and stays in the database; a registered
model's deletion is a real one). The task that creates the lock looks again, creates the run, and
deletes the lock at once; the others wait for the run. The lock exists for those milliseconds only
(a registry webhook on `registered_model.created` would see it). A lock whose holder died is broken
after LOCK_WAIT_S.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from keel.errors import failure_reason

log = logging.getLogger("keel.orchestration")

EXPERIMENT = "keel-pipeline"
FAILURE_TAG = "failure"
LOCK_WAIT_S = 30.0
STATE = ".state"  # `<task>.state`: running, finished, skipped or failed
RUNNING, FINISHED, SKIPPED, FAILED = "running", "finished", "skipped", "failed"


def start_task(tracking_uri: str, dag_id: str, run_id: str, task_id: str) -> str:
    """Mark the task running on its DAG run's MLflow run (created if none): the run is RUNNING."""
    client = _client(tracking_uri)
    run = _dag_run(client, dag_id, run_id).info.run_id
    client.set_tag(run, task_id + STATE, RUNNING)
    _settle(client, run)
    return str(run)


def log_summary(tracking_uri: str, dag_id: str, run_id: str, task_id: str, summary: dict[str, Any]) -> str:
    """Log the task's job summary (or only that it skipped), mark the task done, and end the run if
    no other task is running. Returns the MLflow run id."""
    from mlflow.entities import Metric, RunTag

    client = _client(tracking_uri)
    found = _dag_run(client, dag_id, run_id)
    run = found.info.run_id
    tags = {f"{task_id}.key": str(summary.get("key", ""))}
    if summary.get("skipped"):
        tags |= {f"{task_id}.skipped": "true", task_id + STATE: SKIPPED}
    else:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in sorted(numeric_metrics(summary, task_id).items())]
        client.log_batch(run, metrics=metrics)
        client.log_text(run, json.dumps({k: v for k, v in summary.items() if k != "manifest"}, indent=2,
                                        sort_keys=True), f"summaries/{task_id}.json")
        tags |= {f"{task_id}.skipped": "false", task_id + STATE: FINISHED}
    client.log_batch(run, tags=[RunTag(k, v) for k, v in tags.items()])  # the state last: its numbers are in
    if f"{task_id}.failure" in found.data.tags:  # an earlier try's
        _delete_tag(client, run, f"{task_id}.failure")
    _settle(client, run)
    return str(run)


def fail_task(tracking_uri: str, dag_id: str, run_id: str, task_id: str, error: BaseException) -> None:
    """Mark the task failed with its reason, and the run FAILED if no other task is running. Never
    raises: an MLflow outage must not hide the task's own error (it is logged as a warning)."""
    from mlflow.entities import RunTag

    try:
        client = _client(tracking_uri)
        run = _dag_run(client, dag_id, run_id).info.run_id
        client.log_batch(run, tags=[RunTag(f"{task_id}.failure", failure_reason(error)),
                                    RunTag(task_id + STATE, FAILED)])
        _settle(client, run)
    except Exception as e:  # noqa: BLE001 - whatever MLflow raised, the task's own error is the one to see
        log.warning("could not record the failure of %s in MLflow (%s): %s", task_id, tracking_uri, e)


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


def run_status(tags: dict[str, str]) -> tuple[str, str | None]:
    """The status a run's task states call for, and its `failure` tag (None: none)."""
    states = {k[: -len(STATE)]: v for k, v in tags.items() if k.endswith(STATE)}
    failed = sorted(t for t, s in states.items() if s == FAILED)
    failure = tags.get(f"{failed[0]}.failure", f"[bug] {failed[0]} failed") if failed else None
    if RUNNING in states.values():
        return "RUNNING", failure
    return ("FAILED" if failed else "FINISHED"), failure


def _settle(client: Any, run_id: str, passes: int = 20) -> None:
    """Bring the run's status and `failure` tag in line with its task states, re-reading after each
    write: a parallel task may have written from an older read (see the module docstring)."""
    for _ in range(passes):
        run = client.get_run(run_id)
        status, failure = run_status(run.data.tags)
        ended = status == "RUNNING" or run.info.end_time is not None
        if status == run.info.status and failure == run.data.tags.get(FAILURE_TAG) and ended:
            return
        if failure is None and FAILURE_TAG in run.data.tags:
            _delete_tag(client, run_id, FAILURE_TAG)
        elif failure is not None and failure != run.data.tags.get(FAILURE_TAG):
            client.set_tag(run_id, FAILURE_TAG, failure)
        if status == "RUNNING":
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        elif status != run.info.status or run.info.end_time is None:
            client.set_terminated(run_id, status=status)
    log.warning("MLflow run %s: its status kept changing under parallel tasks; left as last written", run_id)


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)  # the creation lock lives beside the runs


def _experiment_id(client: Any) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(EXPERIMENT))
    except MlflowException:  # created meanwhile by a parallel task
        return str(client.get_experiment_by_name(EXPERIMENT).experiment_id)


def _dag_run(client: Any, dag_id: str, run_id: str) -> Any:
    """The DAG run's MLflow run (an mlflow Run), created once however many tasks look for it at once."""
    exp_id = _experiment_id(client)
    lock = creation_lock(dag_id, run_id)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        if (found := _find(client, exp_id, dag_id, run_id)) is not None:
            return found
        if _acquire(client, lock, dag_id, run_id):
            try:  # look again: the run may have been created between the look and the lock
                return _find(client, exp_id, dag_id, run_id) or client.create_run(
                    exp_id, run_name=f"{dag_id}/{run_id}", tags={"airflow_dag_id": dag_id, "airflow_run_id": run_id})
            finally:
                _release(client, lock)
        if time.monotonic() > deadline:  # its holder died between taking it and creating the run
            log.warning("breaking the MLflow run lock %s of %s/%s, held past %.0f s", lock, dag_id, run_id,
                        LOCK_WAIT_S)
            _release(client, lock)
            deadline = time.monotonic() + LOCK_WAIT_S
        time.sleep(0.05)


def creation_lock(dag_id: str, run_id: str) -> str:
    """The registered model that locks the creation of a DAG run's run (a model name allows no ':')."""
    return "keel-pipeline-lock-" + hashlib.sha256(f"{dag_id}\n{run_id}".encode()).hexdigest()[:32]


def _find(client: Any, exp_id: str, dag_id: str, run_id: str) -> Any:
    found = client.search_runs([exp_id], max_results=1, order_by=["attributes.start_time ASC"],
                               filter_string=f"tags.airflow_dag_id = '{dag_id}' and tags.airflow_run_id = '{run_id}'")
    return found[0] if found else None


def _acquire(client: Any, lock: str, dag_id: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            lock, tags={"airflow_dag_id": dag_id, "airflow_run_id": run_id},
            description=f"Keel: lock held while creating the MLflow run of {dag_id}/{run_id}, deleted at once. "
                        "One left behind is from a task that died holding it: safe to delete.")
        return True
    except MlflowException as e:
        if e.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):  # held (or just let go)
            return False
        raise


def _release(client: Any, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _delete_tag(client: Any, run_id: str, key: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_tag(run_id, key)
    except MlflowException as e:  # absent, or deleted meanwhile by a parallel task
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
