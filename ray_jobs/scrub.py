"""Ray job: redact the zone's current raw snapshot into a scrubbed snapshot plus a quarantine.

    python -m ray_jobs.scrub --zone us [--input-key RAW_KEY]

Documents already scrubbed under the same config are reused by id (a document id is a hash of
its source and bytes), so a daily run only pays for new and changed documents.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from keel.orchestration import chain
from keel.pipeline import scrub
from keel.pipeline.snapshots import SnapshotStore, read_parts, write_parts
from keel.settings import KeelSettings
from ray_jobs._job import free_resources, main, stage_run

STAGE = chain.stage("scrub")


def run(zone: str, input_key: str | None = None, config: str | None = None) -> dict[str, Any]:
    with stage_run(STAGE, zone, config) as job:
        raw = job.read_input(input_key)
        if (done := job.committed()) is not None:
            return job.skip(done, done["counts"], counts=done["counts"], findings=done["findings"])

        with job.timer.stage("plan"):
            ids = read_parts(job.input_store, raw, "documents", ["doc_id"])["doc_id"]
            reused_docs, reused_q = _reusable(job.store, job.version, ids)
            done_ids = pa.concat_arrays([reused_docs["doc_id"].combine_chunks(), reused_q["doc_id"].combine_chunks()])
        with job.timer.stage("scrub"):
            fresh = _scrub(job.settings, job.input_store, raw, done_ids)
        with job.timer.stage("write"):
            docs, quarantined = scrub.split(fresh)
            docs = pa.concat_tables([reused_docs, docs])
            quarantined = pa.concat_tables([reused_q, quarantined])
            staging = job.begin()
            write_parts(staging, "documents", docs, sort_by="doc_id")
            write_parts(staging, "quarantine", quarantined, sort_by="doc_id")
            counts = {"in": len(ids), "out": docs.num_rows, "quarantined": quarantined.num_rows,
                      "reused": len(done_ids), "scrubbed": fresh.num_rows}
            manifest = job.commit(staging, {"counts": counts, "findings": scrub.findings_total(docs),
                                            "quarantine_reasons": scrub.quarantine_reasons(quarantined)}, counts)
    return job.result(manifest, counts=counts, findings=manifest["findings"],
                      quarantine_reasons=manifest["quarantine_reasons"])


def _reusable(store: SnapshotStore, version: str, ids: pa.ChunkedArray) -> tuple[pa.Table, pa.Table]:
    """Rows of the previous scrubbed snapshot (same config) for documents still in the raw snapshot."""
    prev = store.current()
    if prev is None or prev.get("config_version") != version:
        return scrub.DOCS_SCHEMA.empty_table(), scrub.QUARANTINE_SCHEMA.empty_table()
    keep = ids.combine_chunks() if len(ids) else pa.array([], pa.string())
    docs = read_parts(store, prev, "documents").cast(scrub.DOCS_SCHEMA)
    q = read_parts(store, prev, "quarantine")
    q = q.cast(scrub.QUARANTINE_SCHEMA) if q.num_columns else scrub.QUARANTINE_SCHEMA.empty_table()
    return docs.filter(pc.is_in(docs["doc_id"], value_set=keep)), q.filter(pc.is_in(q["doc_id"], value_set=keep))


def _scrub(settings: KeelSettings, raw_store: SnapshotStore, raw: dict[str, Any], skip: pa.Array) -> pa.Table:
    import ray
    import ray.data

    table = read_parts(raw_store, raw, "documents")
    if len(skip):
        table = table.filter(pc.invert(pc.is_in(table["doc_id"], value_set=skip)))
    if not table.num_rows:
        return scrub.SCRUB_OUT_SCHEMA.empty_table()
    # The plan holds only the actor stage: with every CPU given to scrub actors, a separate read or
    # filter task could never be scheduled (measured: a 2-CPU node deadlocks on 2 actors + a read).
    cpus = max(1, int(free_resources()["CPU"]))
    actors = min(settings.pipeline.scrub_actors, cpus)
    step = max(settings.pipeline.scrub_batch_size, -(-table.num_rows // (4 * actors)))
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]  # enough blocks for every actor
    ds = ray.data.from_arrow(blocks).map_batches(
        scrub.Scrubber,
        fn_constructor_args=(settings,),
        fn_constructor_kwargs={"own_process": True},
        batch_size=settings.pipeline.scrub_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        return scrub.SCRUB_OUT_SCHEMA.empty_table()
    return pa.concat_tables([t.cast(scrub.SCRUB_OUT_SCHEMA) for t in tables])


if __name__ == "__main__":
    main(STAGE, __doc__, run)
