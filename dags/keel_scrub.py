"""keel_scrub_<zone>: raw -> scrubbed (PII redacted, bad records quarantined) -> Great Expectations gate.

Runs when the zone's raw asset updates. The scrubbed asset is an outlet of the validation task
only, so a failed gate emits no event and the index DAG stays blocked.
"""

from __future__ import annotations

from datetime import datetime, timezone

from airflow.sdk import dag, task

from keel.orchestration import stages
from keel.settings import get_settings

settings = get_settings()


def scrub_dag(zone: str) -> None:
    raw = stages.asset(settings, zone, "raw")
    scrubbed = stages.asset(settings, zone, "scrubbed")

    @task(task_id=f"scrub_{zone}", inlets=[raw])
    def scrub(**context):  # type: ignore[no-untyped-def]
        key = stages.triggering_key(context, raw)
        return stages.run_stage("ray_jobs.scrub", zone, ["--raw-key", key] if key else [], context)

    @task(task_id=f"validate_{zone}", outlets=[scrubbed])
    def validate(summary: dict, **context):  # type: ignore[no-untyped-def]
        return stages.run_stage("ray_jobs.validate", zone, ["--scrubbed-key", summary["key"]], context, scrubbed)

    @dag(
        dag_id=f"keel_scrub_{zone}",
        schedule=[raw],
        start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        default_args=stages.task_defaults(settings),
        tags=["keel", "batch", zone],
        doc_md=__doc__,
    )
    def chain() -> None:
        validate(scrub())

    chain()


for _zone in stages.zones_with_sources(settings):
    scrub_dag(_zone)
