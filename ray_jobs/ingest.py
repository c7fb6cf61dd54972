"""Ray job: ingest the zone's landing sources into its raw snapshot.

    python -m ray_jobs.ingest --zone us --ingest-time 2026-11-26T00:00:00+00:00
"""

from __future__ import annotations

from typing import Any

from keel.pipeline import ingest
from keel.pipeline.snapshots import SnapshotStore, read_parts, snapshot_key, write_parts
from keel.settings import get_settings, load_settings
from keel.storage import ZoneStorage
from ray_jobs._job import Timer, audited, emit, init_ray, parse_args


def run(zone: str, ingest_time: str, config: str | None = None) -> dict[str, Any]:
    settings = load_settings(config) if config else get_settings()
    storage = ZoneStorage.for_zone(settings, zone)
    store = SnapshotStore(storage, "raw", keep=settings.pipeline.keep_snapshots)
    timer = Timer()
    with audited(settings, "raw", zone) as audit:
        with timer.stage("list"):
            files = ingest.list_landing(settings, zone)
            listing = ingest.listing_hash(settings, zone, files)
            key = snapshot_key("raw", listing, settings.config_version())
        # The landing listing is this stage's input manifest: its hash names every file's path, size and mtime.
        audit.input = {"stage": "landing", "sha256": listing}
        summary: dict[str, Any] = {"stage": "raw", "zone": zone, "key": key, "files": len(files)}
        if (done := store.committed(key)) is not None:
            audit.output, audit.skipped = done, True
            audit.counts = {"files": len(files), "documents": done["counts"]["documents"]}
            return {**summary, "skipped": "already committed", "documents": done["counts"]["documents"], "manifest": done,
                    "durations": timer.durations}

        previous = store.current()
        prev_table = read_parts(store, previous, "documents", ["doc_id", "source", "ingest_time"]) if previous else None
        prev_times = dict(zip(prev_table["doc_id"].to_pylist(), prev_table["ingest_time"].to_pylist())) if prev_table else {}

        with timer.stage("read"):
            records = _read_all(files)
        with timer.stage("write"):
            table = ingest.raw_rows(records, settings, zone, prev_times, ingest_time)
            staging = store.begin(key)
            write_parts(staging, "documents", table, sort_by="doc_id")
            changes = ingest.changes(prev_table, table)
            manifest = store.commit(
                staging,
                {"inputs": {"listing_files": len(files)}, "config_version": settings.config_version(),
                 "counts": {"documents": table.num_rows}, "changes": changes},
            )
        counts = {k: v for k, v in changes.items() if k != "tombstones"}  # tombstones are source paths
        audit.output, audit.counts = manifest, {"files": len(files), "documents": table.num_rows, **counts}
    return {**summary, "documents": table.num_rows, "changes": counts, "manifest": manifest, "durations": timer.durations}


def _read_all(files: list[ingest.LandingFile]) -> list[tuple[ingest.LandingFile, Any]]:
    """Read landing files in parallel Ray tasks (I/O bound: many small files, or S3)."""
    import ray

    if len(files) < 64:
        return [(f, r) for f in files for r in ingest.read_file_records(f)]
    read = ray.remote(num_cpus=0.25)(lambda batch: [(f, r) for f in batch for r in ingest.read_file_records(f)])
    batches = [files[i : i + 256] for i in range(0, len(files), 256)]
    return [pair for chunk in ray.get([read.remote(b) for b in batches]) for pair in chunk]


def main() -> None:
    args = parse_args(__doc__, lambda p: p.add_argument("--ingest-time", required=True,
                                                        help="the DAG run's logical time, stored per new document"))
    init_ray()
    emit(run(args.zone, args.ingest_time, args.config))


if __name__ == "__main__":
    main()
