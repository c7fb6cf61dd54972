"""The audit record of one batch job run: one `transformation` record in its zone's audit trail
(keel.audit) saying what the run read and committed (snapshot keys and manifest SHA-256s), its
counts and how it ended, never document text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from keel.audit import Trails
from keel.errors import classify
from keel.pipeline.snapshots import manifest_hash
from keel.settings import KeelSettings

log = logging.getLogger("keel.jobs")


def manifest_ref(manifest: dict[str, Any]) -> dict[str, str]:
    """A committed snapshot as the audit trail names it: the manifest lists every file's SHA-256,
    so the manifest's own SHA-256 pins the snapshot's bytes (and equals that of `_manifest.json`)."""
    return {"stage": manifest["stage"], "key": manifest["key"], "sha256": manifest_hash(manifest)}


def transformation_fields(*, job: str, job_id: str, zone: str, data_classes: list[str], status: str,
                          input: dict[str, Any] | None, output: dict[str, Any] | None, counts: dict[str, Any],
                          config_version: str, duration_s: float, airflow: dict[str, str] | None = None,
                          error_kind: str | None = None) -> dict[str, Any]:
    """The fields of one `transformation` audit record (pure). `output` is the committed manifest;
    counts must be numbers, so no document text or value can slip into the trail through them."""
    fields: dict[str, Any] = {
        "job": job, "job_id": job_id, **(airflow or {}), "zone": zone, "data_classes": sorted(data_classes),
        "status": status, "input": input, "output": manifest_ref(output) if output else None,
        "counts": {k: int(v) for k, v in counts.items()}, "config_version": config_version,
        "duration_s": round(duration_s, 3),
    }
    if error_kind:
        fields["error_kind"] = error_kind
    return fields


def job_context() -> tuple[str, dict[str, str]]:
    """This run's Ray job submission id and the Airflow run that submitted it. The Jobs API hands a
    job its metadata (the submission id, and the airflow_* entries keel.orchestration.stages sets,
    as it tags MLflow runs) in this env var; a job called in-process (tests, a shell) has none,
    so a uuid names the run."""
    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    meta = config.get("metadata") or {}
    airflow = {k: str(meta[k]) for k in ("airflow_dag_id", "airflow_run_id") if meta.get(k)}
    return str(meta.get("job_submission_id") or uuid.uuid4().hex), airflow


@dataclass
class Transformation:
    """What a run did, filled in by the job as it learns it; `audited` records it when the run ends."""

    input: dict[str, Any] | None = None  # a manifest_ref, or what stands for one (ingest: the listing)
    output: dict[str, Any] | None = None  # the committed manifest
    counts: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # the output was already committed: this run only found it


@contextmanager
def audited(settings: KeelSettings, job: str, zone: str) -> Iterator[Transformation]:
    """Append one `transformation` record to the zone's audit trail when the run ends: "committed",
    "skipped" (a re-run that found its output committed: recorded, so every run is, but no new
    data) or "failed" with the failure kind. A failed run raises its own error, not an audit one."""
    run, t0 = Transformation(), time.perf_counter()
    job_id, airflow = job_context()
    data_classes = sorted({s.data_class.value for s in settings.pipeline.sources if s.zone == zone})

    def record(status: str, error_kind: str | None = None) -> None:
        fields = transformation_fields(job=job, job_id=job_id, zone=zone, data_classes=data_classes, status=status,
                                       input=run.input, output=run.output, counts=run.counts,
                                       config_version=settings.config_version(),
                                       duration_s=time.perf_counter() - t0, airflow=airflow, error_kind=error_kind)
        _append(settings, zone, re.sub(r"[^A-Za-z0-9_.-]", "_", f"job-{job}-{job_id}")[:128], fields)

    try:
        yield run
    except Exception as e:
        try:
            record("failed", classify(e).value)
        except Exception:
            log.exception("zone %s: could not record the failed %s run in the audit trail", zone, job)
        raise
    record("skipped" if run.skipped else "committed")


def _append(settings: KeelSettings, zone: str, writer: str, fields: dict[str, Any]) -> None:
    trails = Trails(settings, writer)
    try:
        trails.append(zone, "transformation", **fields)
    finally:
        trails.close()
