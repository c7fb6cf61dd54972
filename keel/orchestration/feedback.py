"""The feedback DAG, `keel_feedback` (its one DAG file: dags/keel_feedback.py).

Daily (after the evaluation's run) and on demand, over every zone of the policy:

    expire_<zone>  ->  dataset_<zone>      (outlet: the asset keel_<zone>_feedback_dataset)
    expire_<zone>* ->  report

- `expire_<zone>`: retention, in the task itself (a few DELETEs): kept exchanges past their expiry and
  request links older than `feedback.window_days` leave the zone's store, and every dataset version
  holding such an exchange leaves its storage (keel.feedback.dataset.expire_versions).
- `dataset_<zone>`: the Ray job `ray_jobs.feedback_dataset` builds the zone's fine-tuning dataset (the
  PII engine scrubs every text, as the pipeline's heavy steps run on Ray) and publishes a new version
  when its content changed: the task's asset event names it, so a training DAG can be scheduled on
  the asset. An unchanged (or still empty) dataset ends the task skipped: no event.
- `report`: feedback aggregated across zones (counts and scores, no text) into MLflow, experiment
  `keel-feedback` (keel.feedback.report), with what retention deleted; skipped when no tracking URI
  is configured.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from keel.orchestration.stages import asset, daily_at, task_defaults
from keel.settings import KeelSettings, config_path, get_settings

log = logging.getLogger("keel.orchestration")

DAG_ID = "keel_feedback"
CRON = "30 4 * * *"  # daily, after keel_evaluate's 04:00 run
DATASET = "feedback_dataset"  # keel.feedback.dataset.STORE, named here so parsing the DAG imports no more


def zones(settings: KeelSettings) -> list[str]:
    """Every zone: feedback lives where its request's data went, sources or not."""
    return sorted(settings.policy.zones)


def build_dag(settings: KeelSettings) -> Any:
    from airflow.sdk import DAG, Param, task

    params = {"report_days": Param(settings.feedback.window_days, type="number", minimum=0,
                                   description="feedback updated in the last this many days; 0: all of it")}
    doc = (f"**{DAG_ID}** deletes kept exchanges past their retention, reports feedback to MLflow (experiment "
           f"`keel-feedback`) and publishes each zone's fine-tuning dataset as the asset "
           f"`keel_<zone>_{DATASET}`. Daily (`{CRON}`) and on demand (`report_days`).")
    # No start_date, as keel_evaluate: the first daily run waits for its time.
    with DAG(dag_id=DAG_ID, schedule=daily_at(CRON), catchup=False, max_active_runs=1,
             params=params, tags=["keel", "feedback"], doc_md=doc, default_args=task_defaults(settings)) as dag:
        expired = {zone: _zone_tasks(settings, zone) for zone in zones(settings)}

        @task(task_id="report")
        def report(expired: dict[str, dict[str, int]], **context: Any) -> dict[str, Any]:
            with failing_at_once():
                return run_report(expired, context)

        report(expired)
    return dag


def _zone_tasks(settings: KeelSettings, zone: str) -> Any:
    """expire_<zone> then dataset_<zone>; returns expire's output, which the report logs."""
    from airflow.sdk import task

    outlet = asset(settings, zone, DATASET)

    @task(task_id=f"expire_{zone}")
    def expire() -> dict[str, int]:
        with failing_at_once():
            return expire_zone(get_settings(), zone, time.time())

    @task(task_id=f"dataset_{zone}", outlets=[outlet])
    def dataset(**context: Any) -> dict[str, Any]:
        return run_dataset(zone, outlet, context)

    expired = expire()
    expired >> dataset()
    return expired


@contextmanager
def failing_at_once() -> Iterator[None]:
    """Keel's own errors that a retry cannot help (a bad config: a zone on S3 without a feedback database) fail
    the task at once, as the failure callback's alert says; anything else (the database away a moment) is retried."""
    from airflow.sdk.exceptions import AirflowFailException

    from keel.errors import KeelError

    try:
        yield
    except KeelError as e:
        if not e.kind.retryable:
            raise AirflowFailException(f"[{e.kind.value}] {e}") from e
        raise


def expire_zone(settings: KeelSettings, zone: str, now: float) -> dict[str, int]:
    """Body of expire_<zone>: the retention deletion in the zone's store and dataset versions."""
    from keel.feedback import dataset
    from keel.feedback.store import open_zone
    from keel.storage import ZoneStorage

    store = open_zone(settings, zone)
    try:
        fb = settings.feedback
        counts = store.expire(now, fb.window_days * 86400, fb.retention_days * 86400)
    finally:
        store.close()
    versions = dataset.expire_versions(ZoneStorage.for_zone(settings, zone), now)
    counts["dataset_versions"] = len(versions)
    log.info("zone %s: deleted %d expired exchange(s), %d request link(s) past the window, the words of %d "
             "feedback(s) past retention, %d dataset version(s)%s", zone, counts["exchanges"], counts["requests"],
             counts["words"], len(versions), f" {versions}" if versions else "")
    return counts


def run_report(expired: dict[str, dict[str, int]], context: dict[str, Any]) -> dict[str, Any]:
    """Body of report: every zone's feedback of the period, aggregated into the DAG run's MLflow run."""
    from airflow.sdk.exceptions import AirflowSkipException

    from keel.feedback import report
    from keel.feedback.store import open_zone

    settings = get_settings()
    uri = settings.pipeline.mlflow_tracking_uri
    if not uri:
        raise AirflowSkipException("no MLflow tracking URI (pipeline.mlflow_tracking_uri): the feedback report "
                                   "is not logged")
    ti, days = context["ti"], float(context["params"]["report_days"])
    since = time.time() - days * 86400 if days else None
    rows: list[dict[str, Any]] = []
    for zone in zones(settings):
        store = open_zone(settings, zone)
        try:  # counts and scores only go on: the words stay in the zone
            rows += [report.without_text(r, zone) for r in store.feedback(since)]
        finally:
            store.close()
    groups = report.aggregate(rows)
    run = report.log(uri, ti.dag_id, ti.run_id, groups, expired, {"report_days": f"{days:g}"})
    log.info("feedback report: %d rating(s), MLflow run %s", groups[0].n, run)
    for g in groups[1:]:
        log.info("  %-10s %-32s n=%-5d mean %.2f  up %d down %d", g.dimension, g.value, g.n, g.mean_score, g.up,
                 g.down)
    return {"run_id": run, "feedback": groups[0].n}


def run_dataset(zone: str, outlet: Any, context: dict[str, Any]) -> dict[str, Any]:
    """Body of dataset_<zone>: the Ray job for this try (attached to an earlier try's still running), then
    the new version on the outlet, or the task skipped when there is none."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from keel.errors import classify
    from keel.orchestration.ray_jobs import run_job, submission_id

    settings = get_settings()
    ti = context["ti"]
    tries = int(ti.try_number or 1)
    ids = [submission_id(ti.dag_id, ti.task_id, ti.run_id, n) for n in range(1, tries + 1)]
    command = [settings.pipeline.job_python or sys.executable, "-m", "ray_jobs.feedback_dataset", "--zone", zone]
    env = {"KEEL_CONFIG": str(config_path().resolve()), "KEEL_HOME": str(settings.home)}
    try:
        result = run_job(settings.ray_address, command, job_id=ids[-1], earlier_ids=ids[:-1], env=env,
                         metadata={"airflow_dag_id": ti.dag_id, "airflow_run_id": ti.run_id,
                                   "airflow_task_id": ti.task_id})
    except Exception as e:
        if not classify(e).retryable:  # a bug or a bad config fails the same way again
            raise AirflowFailException(f"[{classify(e).value}] {e}") from e
        raise
    log.info("feedback dataset of %s: %s", zone, result)
    if result["status"] != "published":
        raise AirflowSkipException(f"feedback dataset of zone {zone}: {result['status']} (current version: "
                                   f"{result['current'] or 'none'}), nothing new for {outlet.name}")
    context["outlet_events"][outlet].extra = {k: result[k] for k in ("version", "zone", "rows", "counts")}
    return result
