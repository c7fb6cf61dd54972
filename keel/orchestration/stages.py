"""The batch chain as Airflow assets and tasks; the DAG files in dags/ only assemble these.

Per zone, three assets in the zone's own storage, so the lineage shows in the Airflow UI:

    keel_<zone>_raw  ->  keel_<zone>_scrubbed (validated)  ->  keel_<zone>_index

A stage task submits its Ray job, streams the job's log into the task log, logs the job's summary
to MLflow, and emits its asset event with the committed snapshot key in the event's extra. The
next DAG reads that key from its triggering asset event: the event names the exact input, so a
run is keyed on (asset, input manifest, config version) even without a data interval.
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from typing import Any

from keel import alerts
from keel.failures import classify
from keel.settings import KeelSettings, config_path, get_settings
from keel.storage import ZoneStorage

log = logging.getLogger("keel.orchestration")

STAGES = ("raw", "scrubbed", "index")


def asset(settings: KeelSettings, zone: str, stage: str):  # type: ignore[no-untyped-def]
    from airflow.sdk import Asset

    return Asset(uri=ZoneStorage.for_zone(settings, zone).uri(stage), name=f"keel_{zone}_{stage}",
                 group="keel", extra={"zone": zone, "stage": stage})


def zones_with_sources(settings: KeelSettings) -> list[str]:
    return sorted({s.zone for s in settings.pipeline.sources})


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


def task_defaults(settings: KeelSettings) -> dict[str, Any]:
    return {
        "retries": settings.pipeline.retries,
        "retry_delay": timedelta(seconds=settings.pipeline.retry_delay_s),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
        "on_failure_callback": on_failure,
        "on_retry_callback": on_failure,
    }


def run_stage(module: str, zone: str, args: list[str], context: dict[str, Any], outlet: Any | None = None) -> dict[str, Any]:
    """Body of a stage task: run the Ray job, log to MLflow, annotate the outlet event."""
    from airflow.sdk.exceptions import AirflowFailException

    from keel.orchestration.ray_jobs import run_job, submission_id
    from keel.orchestration.tracking import log_summary

    settings = get_settings()
    ti = context["ti"]
    tries = int(ti.try_number or 1)
    ids = [submission_id(ti.dag_id, ti.task_id, ti.run_id, n) for n in range(1, tries + 1)]
    env = {"KEEL_CONFIG": str(config_path().resolve()), "KEEL_HOME": str(settings.home)}
    python = settings.pipeline.job_python or sys.executable
    try:
        result = run_job(
            settings.ray_address,
            [python, "-m", module, "--zone", zone, *args],
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
    summary = {k: v for k, v in result.items() if k != "manifest"}
    log.info("run summary: %s", summary)
    if settings.pipeline.mlflow_tracking_uri:
        run = log_summary(settings.pipeline.mlflow_tracking_uri, ti.dag_id, ti.run_id, ti.task_id, result)
        log.info("logged to MLflow run %s", run)
    if outlet is not None:
        context["outlet_events"][outlet].extra = {"key": result.get("asset_key", result["key"]), "zone": zone,
                                                  "stage": result["stage"],
                                                  "counts": result.get("counts") or {}}
    return summary


def triggering_key(context: dict[str, Any], inlet: Any) -> str | None:
    """The snapshot key named by the newest asset event that triggered this run (None: run by hand)."""
    events = context.get("triggering_asset_events") or {}
    for key_asset, evs in events.items():
        if getattr(key_asset, "uri", key_asset) in (inlet.uri, inlet.name) or key_asset == inlet:
            evs = list(evs)
            if evs and (evs[-1].extra or {}).get("key"):
                return str(evs[-1].extra["key"])
    return None
