"""Ray job: the Great Expectations gate over the zone's committed scrubbed snapshot.

    python -m ray_jobs.validate --zone us [--input-key SCRUBBED_KEY]

The verdict is stored (idempotently) as a `validation` snapshot keyed on the scrubbed manifest.
The job exits non-zero with a DataQualityError when the suite fails, so the Airflow task fails
as "data quality" and the downstream asset is not updated.
"""

from __future__ import annotations

import json
from typing import Any

from keel.audit import canonical
from keel.errors import DataQualityError
from keel.orchestration import chain
from keel.pipeline import quality
from keel.pipeline.snapshots import SnapshotStore, manifest_hash, read_parts, snapshot_key
from keel.storage import ZoneStorage
from ray_jobs._job import emit, main, stage_run

STAGE = chain.stage("validate")
VERDICT = "verdict.json"


def run(zone: str, input_key: str | None = None, config: str | None = None) -> dict[str, Any]:
    with stage_run(STAGE, zone, config) as job:
        scrubbed = job.read_input(input_key)
        done = job.committed()
        if done is not None:
            verdict = _verdict(job.store, job.key)
        else:
            with job.timer.stage("validate"):
                docs = read_parts(job.input_store, scrubbed, "documents")
                verdict = quality.validate(docs, scrubbed["counts"]["quarantined"],
                                           job.settings.pipeline.max_quarantine_share)
        failed = [c["check"] for c in verdict["checks"] if not c["success"]]
        counts = {"documents": scrubbed["counts"]["out"], "quarantined": scrubbed["counts"]["quarantined"],
                  "checks": len(verdict["checks"]), "checks_failed": len(failed)}
        outcome = {"success": verdict["success"], "checks": verdict["checks"]}
        if done is not None:
            result = job.skip(done, counts, **outcome)
        else:
            staging = job.begin()
            staging.write_bytes(canonical(verdict), VERDICT)
            result = job.result(job.commit(staging, {"success": verdict["success"]}, counts), **outcome)
        if not verdict["success"]:
            # A failed gate still committed its verdict: the record names it, and ends "failed" (data_quality).
            emit(result)
            raise DataQualityError(f"zone {zone}: scrubbed snapshot {scrubbed['key']} failed validation: {failed}")
    return result


def _verdict(store: SnapshotStore, key: str) -> dict[str, Any]:
    return dict(json.loads(store.read_file(key, VERDICT)))


def passed(storage: ZoneStorage, scrubbed: dict[str, Any], config_version: str) -> bool:
    """Did this scrubbed snapshot pass the gate (under this config)?"""
    store = SnapshotStore(storage, STAGE.commits)
    key = snapshot_key(STAGE.commits, manifest_hash(scrubbed), config_version)
    return store.committed(key) is not None and bool(_verdict(store, key)["success"])


if __name__ == "__main__":
    main(STAGE, __doc__, run)
