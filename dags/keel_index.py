"""keel_index_<zone>: validated scrubbed documents -> token-aware chunks -> MiniLM embeddings -> LanceDB index.

Runs when the zone's scrubbed asset updates (which only happens after validation passed).
"""

from __future__ import annotations

from datetime import datetime, timezone

from airflow.sdk import dag, task

from keel.orchestration import stages
from keel.settings import get_settings

settings = get_settings()


def index_dag(zone: str) -> None:
    scrubbed = stages.asset(settings, zone, "scrubbed")
    index_asset = stages.asset(settings, zone, "index")

    @task(task_id=f"index_{zone}", inlets=[scrubbed], outlets=[index_asset])
    def index(**context):  # type: ignore[no-untyped-def]
        key = stages.triggering_key(context, scrubbed)
        return stages.run_stage("ray_jobs.index", zone, ["--scrubbed-key", key] if key else [], context, index_asset)

    @dag(
        dag_id=f"keel_index_{zone}",
        schedule=[scrubbed],
        start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
        catchup=False,
        max_active_runs=1,
        default_args=stages.task_defaults(settings),
        tags=["keel", "batch", zone],
        doc_md=__doc__,
    )
    def chain() -> None:
        index()

    chain()


for _zone in stages.zones_with_sources(settings):
    index_dag(_zone)
