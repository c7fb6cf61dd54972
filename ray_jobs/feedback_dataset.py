"""Ray job: build a zone's fine-tuning dataset from its feedback store and publish it when it changed.

    python -m ray_jobs.feedback_dataset --zone us

Submitted by the keel_feedback DAG (keel.orchestration.feedback). The PII engine scrubs every text of
the kept exchanges (keel.feedback.dataset); a new version is committed in the zone's storage and its
summary printed as the last log line, `status` saying whether there is a new version ("published"),
or not ("unchanged", "empty"). One `transformation` record in the zone's audit trail says what was
read (a hash of the ratings, no text) and what was committed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from keel.feedback import dataset
from keel.feedback.store import open_zone
from keel.settings import KeelSettings, get_settings, load_settings
from keel.storage import ZoneStorage
from ray_jobs._audit import audited
from ray_jobs._job import Timer, emit


def run(settings: KeelSettings, zone: str, now: float | None = None) -> dict[str, Any]:
    from keel.privacy import without_torch

    now = time.time() if now is None else now
    timer = Timer()
    with audited(settings, dataset.STORE, zone) as audit:
        with timer.stage("load"), without_torch():  # spaCy's CPU pipeline: torch would only cost memory
            from keel.privacy.engine import PrivacyEngine

            engine = PrivacyEngine(settings.privacy)
        store = open_zone(settings, zone)
        try:
            with timer.stage("build"):
                ds = dataset.build(store, engine, now)
        finally:
            store.close()
        audit.input = {"stage": "feedback", "sha256": ds.fields["source_sha256"]}
        with timer.stage("publish"):
            published = dataset.publish(ZoneStorage.for_zone(settings, zone), ds, now,
                                        keep=settings.pipeline.keep_snapshots)
        audit.skipped = published.status != "published"
        audit.output = published.manifest if published.status == "published" else None
        audit.counts = {"rows": ds.rows, **ds.fields["counts"]["left_out"]}
    return {"zone": zone, "status": published.status, "version": ds.version, "rows": ds.rows,
            "counts": ds.fields["counts"], "findings": ds.fields["findings"],
            "tokens_unified": ds.fields["tokens_unified"], "durations": timer.durations,
            "current": (published.manifest or {}).get("key")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zone", required=True, help="the zone whose feedback store and storage this job reads and writes")
    p.add_argument("--config", default=None, help="keel.yaml (default: $KEEL_CONFIG, ./keel.yaml, the example)")
    a = p.parse_args()
    emit(run(load_settings(a.config) if a.config else get_settings(), a.zone))


if __name__ == "__main__":
    main()
