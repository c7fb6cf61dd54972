"""Ray job: the Great Expectations gate over the zone's committed scrubbed snapshot.

    python -m ray_jobs.validate --zone us [--scrubbed-key KEY]

The verdict is stored (idempotently) as a `validation` snapshot keyed on the scrubbed manifest.
The job exits non-zero with a DataQualityError when the suite fails, so the Airflow task fails
as "data quality" and the downstream asset is not updated.
"""

from __future__ import annotations

from typing import Any

from keel.failures import DataQualityError
from keel.pipeline import quality
from keel.pipeline.snapshots import SnapshotStore, canonical_json, manifest_hash, read_parts, snapshot_key
from keel.settings import get_settings, load_settings
from keel.storage import ZoneStorage
from ray_jobs._job import Timer, audited, emit, init_ray, manifest_ref, parse_args


def run(zone: str, scrubbed_key: str | None = None, config: str | None = None) -> dict[str, Any]:
    settings = load_settings(config) if config else get_settings()
    storage = ZoneStorage.for_zone(settings, zone)
    scrubbed_store = SnapshotStore(storage, "scrubbed", keep=settings.pipeline.keep_snapshots)
    store = SnapshotStore(storage, "validation", keep=settings.pipeline.keep_snapshots)
    with audited(settings, "validation", zone) as audit:
        scrubbed = scrubbed_store.resolve(scrubbed_key)
        audit.input = manifest_ref(scrubbed)
        key = snapshot_key("validation", manifest_hash(scrubbed), settings.config_version())
        # The scrubbed asset's event names the snapshot that passed, so the index run reads exactly that one.
        summary: dict[str, Any] = {"stage": "validation", "zone": zone, "key": key, "input": {"scrubbed": scrubbed["key"]},
                                   "asset_key": scrubbed["key"]}
        timer = Timer()
        manifest = store.committed(key)
        audit.skipped = manifest is not None
        if manifest is None:
            with timer.stage("validate"):
                docs = read_parts(scrubbed_store, scrubbed, "documents")
                verdict = quality.validate(docs, scrubbed["counts"]["quarantined"], settings.pipeline.max_quarantine_share)
            staging = store.begin(key)
            staging.write_bytes(canonical_json(verdict), "verdict.json")
            manifest = store.commit(staging, {"inputs": {"scrubbed": scrubbed["key"]}, "success": verdict["success"],
                                              "config_version": settings.config_version()})
        verdict = _verdict(store, key)
        failed = [c["check"] for c in verdict["checks"] if not c["success"]]
        # A failed gate still committed its verdict: the record names it, and ends "failed" (data_quality) below.
        audit.output = manifest
        audit.counts = {"documents": scrubbed["counts"]["out"], "quarantined": scrubbed["counts"]["quarantined"],
                        "checks": len(verdict["checks"]), "checks_failed": len(failed)}
        result = {**summary, "success": verdict["success"], "checks": verdict["checks"], "manifest": manifest,
                  "durations": timer.durations}
        if not verdict["success"]:
            emit(result)
            raise DataQualityError(f"zone {zone}: scrubbed snapshot {scrubbed['key']} failed validation: {failed}")
    return result


def _verdict(store: SnapshotStore, key: str) -> dict[str, Any]:
    import json

    return json.loads(store.storage.read_bytes("validation", "snapshots", key, "verdict.json"))


def passed(storage: ZoneStorage, scrubbed: dict[str, Any], config_version: str) -> bool:
    """Did this scrubbed snapshot pass the gate (under this config)?"""
    store = SnapshotStore(storage, "validation")
    key = snapshot_key("validation", manifest_hash(scrubbed), config_version)
    return store.committed(key) is not None and _verdict(store, key)["success"]


def main() -> None:
    args = parse_args(__doc__, lambda p: p.add_argument("--scrubbed-key", default=None))
    init_ray()
    emit(run(args.zone, args.scrubbed_key, args.config))


if __name__ == "__main__":
    main()
