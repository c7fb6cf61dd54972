"""keel_ingest: landing sources -> each zone's raw asset (daily, or on demand from the UI)."""

from __future__ import annotations

from datetime import datetime, timezone

from airflow.sdk import dag, task

from keel.orchestration import stages
from keel.settings import get_settings

settings = get_settings()


def ingest_task(zone: str):  # type: ignore[no-untyped-def]
    raw = stages.asset(settings, zone, "raw")

    @task(task_id=f"ingest_{zone}", outlets=[raw])
    def ingest(**context):  # type: ignore[no-untyped-def]
        # The run's logical time becomes the ingest time of documents first seen in this run, so
        # a retry stamps the same time; runs without one (asset or manual) use when they were queued.
        when = context.get("logical_date") or context["dag_run"].run_after
        return stages.run_stage("ray_jobs.ingest", zone, ["--ingest-time", when.isoformat()], context, raw)

    return ingest()


@dag(
    dag_id="keel_ingest",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args=stages.task_defaults(settings),
    tags=["keel", "batch"],
    doc_md=__doc__,
)
def keel_ingest() -> None:
    for zone in stages.zones_with_sources(settings):
        ingest_task(zone)


keel_ingest()
