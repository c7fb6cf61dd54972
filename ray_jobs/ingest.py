"""Ray job: ingest the zone's landing sources into its raw snapshot.

    python -m ray_jobs.ingest --zone us --run-time 2026-11-26T00:00:00+00:00
"""

from __future__ import annotations

from typing import Any

from keel.orchestration import chain
from keel.pipeline import ingest
from keel.pipeline.documents import RawRecord
from keel.pipeline.snapshots import read_parts, write_parts
from ray_jobs._job import main, stage_run

STAGE = chain.stage("ingest")


def run(zone: str, ingest_time: str, config: str | None = None) -> dict[str, Any]:
    """`ingest_time` is the DAG run's logical time: documents first seen in this run keep it."""
    with stage_run(STAGE, zone, config) as job:
        with job.timer.stage("list"):
            files = ingest.list_landing(job.settings, zone)
            job.read_landing(ingest.listing_hash(job.settings, zone, files), len(files))
        if (done := job.committed()) is not None:
            documents = done["counts"]["documents"]
            return job.skip(done, {"files": len(files), "documents": documents}, documents=documents)

        previous = job.store.current()
        prev_table = read_parts(job.store, previous, "documents", ["doc_id", "source", "ingest_time"]) \
            if previous else None
        prev_times = {} if prev_table is None else \
            dict(zip(prev_table["doc_id"].to_pylist(), prev_table["ingest_time"].to_pylist(), strict=True))

        with job.timer.stage("read"):
            records = _read_all(files)
        with job.timer.stage("write"):
            table = ingest.raw_rows(records, job.settings, zone, prev_times, ingest_time)
            staging = job.begin()
            write_parts(staging, "documents", table, sort_by="doc_id")
            changes = ingest.changes(prev_table, table)
            counts = {k: v for k, v in changes.items() if k != "tombstones"}  # tombstones are source paths
            manifest = job.commit(staging, {"counts": {"documents": table.num_rows}, "changes": changes},
                                  {"files": len(files), "documents": table.num_rows, **counts})
    return job.result(manifest, documents=table.num_rows, changes=counts)


def _read_batch(files: list[ingest.LandingFile]) -> list[tuple[ingest.LandingFile, RawRecord]]:
    return [(f, r) for f in files for r in ingest.read_file_records(f)]


def _read_all(files: list[ingest.LandingFile]) -> list[tuple[ingest.LandingFile, RawRecord]]:
    """Read landing files in parallel Ray tasks (I/O bound: many small files, or S3)."""
    import ray

    if len(files) < 64:
        return _read_batch(files)
    read = ray.remote(num_cpus=0.25)(_read_batch)
    batches = [files[i : i + 256] for i in range(0, len(files), 256)]
    return [pair for chunk in ray.get([read.remote(b) for b in batches]) for pair in chunk]


if __name__ == "__main__":
    main(STAGE, __doc__, run)
