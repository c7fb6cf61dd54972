"""The batch chain (keel.orchestration.chain) as Airflow DAGs, assets and tasks; the one DAG file,
dags/keel_batch.py, only calls `build_dags`.

Per zone, three assets in the zone's own storage, so the lineage shows in the Airflow UI:

    keel_<zone>_raw  ->  keel_<zone>_scrubbed (validated)  ->  keel_<zone>_index

A stage task submits its Ray job, streams the job's log into the task log, logs the job's summary
to MLflow, and emits its asset event with the published snapshot key in the event's extra. The
next DAG reads that key from its triggering asset event: the event names the exact input, so a
run is keyed on (asset, input manifest, config version) even without a data interval.

A job that finds its output already committed (the same input under the same config) did nothing
new: its task ends skipped, and Airflow emits no event for a skipped task's outlets, so nothing
downstream runs again. A stage without an outlet (scrub) succeeds instead, so the stage after it
in its DAG still runs and decides for itself (validate: publish, or skip too).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from keel import alerts
from keel.errors import classify
from keel.orchestration import chain
from keel.settings import KeelSettings, config_path, get_settings
from keel.storage import ZoneStorage

log = logging.getLogger("keel.orchestration")

START = datetime(2026, 1, 1, tzinfo=UTC)


def asset(settings: KeelSettings, zone: str, store: str) -> Any:
    from airflow.sdk import Asset

    return Asset(uri=ZoneStorage.for_zone(settings, zone).uri(store), name=f"keel_{zone}_{store}",
                 group="keel", extra={"zone": zone, "stage": store})


def zones_with_sources(settings: KeelSettings) -> list[str]:
    return sorted({s.zone for s in settings.pipeline.sources})


def build_dags(settings: KeelSettings) -> list[Any]:
    """Every DAG of the chain, for the zones that have landing sources: a clock-started DAG runs one
    task per zone for each of its stages; an asset-triggered DAG is built once per zone."""
    zones = zones_with_sources(settings)
    return [_dag(settings, d, zs) for d in chain.dags() for zs in ([[z] for z in zones] if d.per_zone else [zones])]


def _dag(settings: KeelSettings, d: chain.Dag, zones: list[str]) -> Any:
    from airflow.sdk import DAG

    dag_id = d.dag_id(zones[0])
    inlet = asset(settings, zones[0], d.trigger) if d.trigger else None
    when = f"when `{inlet.name}` updates" if inlet else f"daily (`{chain.SCHEDULE}` UTC), or on demand"
    doc = f"**{dag_id}** runs {when}:\n\n" + "\n".join(f"- `{s.name}` ({s.job}): {s.doc}" for s in d.stages)
    tags = ["keel", "batch", *(zones if d.per_zone else [])]
    with DAG(dag_id=dag_id, schedule=[inlet] if inlet else daily_at(chain.SCHEDULE), start_date=START, catchup=False,
             max_active_runs=1, default_args=task_defaults(settings), tags=tags, doc_md=doc) as dag:
        for zone in zones:
            upstream = None
            for s in d.stages:
                upstream = _task(settings, s, zone, inlet if upstream is None else None, upstream)
    return dag


def _task(settings: KeelSettings, stage: chain.Stage, zone: str, inlet: Any, upstream: Any) -> Any:
    """The task of `stage` in `zone`, after `upstream` (the task before it in its DAG, or None)."""
    from airflow.sdk import task

    outlet = asset(settings, zone, stage.publishes) if stage.publishes else None

    @task(task_id=chain.task_id(stage, zone), inlets=[inlet] if inlet else [], outlets=[outlet] if outlet else [],
          doc_md=stage.doc)
    def run(before: dict[str, Any] | None = None, **context: Any) -> dict[str, Any]:
        return run_stage(stage, zone, context, before, inlet, outlet)

    return run(upstream) if upstream is not None else run()


def on_failure(context: Any) -> None:
    """Failure and retry callback: classify the failure and alert at once."""
    ti = context["ti"]
    error = context.get("exception")
    kind = classify(error)
    settings = get_settings()
    alerts.send(
        alerts.Alert(
            kind=kind.value,
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            try_number=int(getattr(ti, "try_number", 0) or 0),
            will_retry=kind.retryable and int(getattr(ti, "try_number", 0) or 0) <= settings.pipeline.retries,
            message=str(error)[:2000] if error else "unknown failure",
            log_url=getattr(ti, "log_url", None),
        ),
        settings.pipeline.alert_webhook,
    )


def daily_at(cron: str) -> Any:
    """A cron timetable (UTC) whose first run waits for its next time. CronTriggerTimetable's default,
    run_immediately=False, still runs the latest past time when it lies within a tenth of the period
    (2.4 h for a daily cron): a stack started at 04:10 would evaluate at once. A zero window runs none."""
    from airflow.sdk import CronTriggerTimetable

    return CronTriggerTimetable(cron, timezone="UTC", run_immediately=timedelta(0))


def task_defaults(settings: KeelSettings) -> dict[str, Any]:
    return {
        "retries": settings.pipeline.retries,
        "retry_delay": timedelta(seconds=settings.pipeline.retry_delay_s),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
        "on_failure_callback": on_failure,
        "on_retry_callback": on_failure,
    }


def job_args(stage: chain.Stage, context: dict[str, Any], before: dict[str, Any] | None, inlet: Any) -> list[str]:
    """The input a stage's job is given: the snapshot the stage before it committed, or the one the
    triggering asset event names (none: run by hand, the job reads CURRENT); for a stage reading the
    landing, the run's logical time, stamped on documents first seen in this run (a retry stamps the
    same), or when the run was queued if it has none (asset-triggered or manual)."""
    if stage.reads is None:
        when = context.get("logical_date") or context["dag_run"].run_after
        return ["--run-time", when.isoformat()]
    if before is not None:
        key: str | None = before["key"]
    else:
        key = triggering_key(context, inlet) if inlet is not None else None
    return ["--input-key", key] if key else []


def run_stage(stage: chain.Stage, zone: str, context: dict[str, Any], before: dict[str, Any] | None = None,
              inlet: Any = None, outlet: Any = None) -> dict[str, Any]:
    """Body of a stage task: run the Ray job, log to MLflow, then publish its snapshot on the outlet,
    or end skipped when the job found its output already committed. The DAG run's MLflow run shows
    the task running, then done, or failed with its reason (keel.orchestration.tracking)."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from keel.orchestration import tracking

    ti = context["ti"]
    mlflow_uri = get_settings().pipeline.mlflow_tracking_uri
    if mlflow_uri:  # MLflow unreachable: the task fails (and is retried) before its job runs, not after
        tracking.start_task(mlflow_uri, ti.dag_id, ti.run_id, ti.task_id)
    try:
        result = run_stage_job(stage, zone, context, before, inlet)
        summary = {k: v for k, v in result.items() if k != "manifest"}
        log.info("run summary: %s", summary)
        if mlflow_uri:
            run = tracking.log_summary(mlflow_uri, ti.dag_id, ti.run_id, ti.task_id, result)
            log.info("logged to MLflow run %s", run)
    except BaseException as e:  # Airflow's timeout and termination too: the MLflow run must not stay RUNNING
        if mlflow_uri:
            tracking.fail_task(mlflow_uri, ti.dag_id, ti.run_id, ti.task_id,
                               (e.__cause__ or e) if isinstance(e, AirflowFailException) else e)
        raise
    if outlet is None:
        return summary
    if result.get("skipped"):
        raise AirflowSkipException(f"{stage.commits} snapshot {result['key']} was already committed: "
                                   f"nothing new for {outlet.name}")
    context["outlet_events"][outlet].extra = {"key": published_key(stage, result), "zone": zone,
                                              "stage": result["stage"], "counts": result.get("counts") or {}}
    return summary


def run_stage_job(stage: chain.Stage, zone: str, context: dict[str, Any], before: dict[str, Any] | None,
               inlet: Any) -> dict[str, Any]:
    """The stage's Ray job for this try (attached to an earlier try's job still running), and its
    summary; a failure that retrying cannot help fails the task at once."""
    from airflow.sdk.exceptions import AirflowFailException

    from keel.orchestration.ray_jobs import run_job, submission_id

    settings = get_settings()
    ti = context["ti"]
    tries = int(ti.try_number or 1)
    ids = [submission_id(ti.dag_id, ti.task_id, ti.run_id, n) for n in range(1, tries + 1)]
    env = {"KEEL_CONFIG": str(config_path().resolve()), "KEEL_HOME": str(settings.home)}
    python = settings.pipeline.job_python or sys.executable
    try:
        return run_job(
            settings.ray_address,
            [python, "-m", stage.job, "--zone", zone, *job_args(stage, context, before, inlet)],
            job_id=ids[-1],
            earlier_ids=ids[:-1],
            env=env,
            metadata={"airflow_dag_id": ti.dag_id, "airflow_run_id": ti.run_id, "airflow_task_id": ti.task_id},
        )
    except Exception as e:
        kind = classify(e)
        if not kind.retryable:  # retrying a data-quality failure or a bug only repeats it
            raise AirflowFailException(f"[{kind.value}] {e}") from e
        raise


def published_key(stage: chain.Stage, result: dict[str, Any]) -> str:
    """The snapshot a stage's asset event names: its own output, or (validate) the input it approved."""
    return str(result["key"] if stage.publishes == stage.commits else result["input"][stage.publishes])


def triggering_key(context: dict[str, Any], inlet: Any) -> str | None:
    """The snapshot key named by the newest asset event that triggered this run (None: run by hand)."""
    events = context.get("triggering_asset_events") or {}
    for key_asset, evs in events.items():
        if getattr(key_asset, "uri", key_asset) in (inlet.uri, inlet.name) or key_asset == inlet:
            evs = list(evs)
            if evs and (evs[-1].extra or {}).get("key"):
                return str(evs[-1].extra["key"])
    return None
