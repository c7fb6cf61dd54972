"""What every Keel Ray job shares: its command line, the Ray connection, and `StageRun`, the
boilerplate of one run of a chain stage in one zone.

A stage's job is its logic only:

    with stage_run(STAGE, zone, config) as job:
        source = job.read_input(input_key)        # the input snapshot; names this run's key
        if (done := job.committed()) is not None:
            return job.skip(done, done["counts"]) # found, not redone: no asset event follows
        staging = job.begin()
        ...                                       # write the output into staging
        manifest = job.commit(staging, {...}, counts)
    return job.result(manifest, counts=counts)

The stores it reads and commits come from its line in keel.orchestration.chain. The summary it
returns is printed as the job's last log line (keel.orchestration.job_result) for the Airflow task.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from keel.errors import ConfigError
from keel.orchestration.chain import Stage
from keel.orchestration.job_result import format_result
from keel.pipeline.snapshots import SnapshotStore, Staging, manifest_hash, snapshot_key
from keel.settings import KeelSettings, get_settings, load_settings
from keel.storage import ZoneStorage
from ray_jobs._audit import Transformation, audited, manifest_ref


class Timer:
    """Stage durations for the run summary."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.durations[name] = round(self.durations.get(name, 0.0) + time.perf_counter() - t0, 3)


class StageRun:
    """One run of a chain stage in one zone: its settings, zone storage and snapshot stores, its
    idempotency key, its audit record and timings, and its summary."""

    def __init__(self, stage: Stage, zone: str, settings: KeelSettings, audit: Transformation) -> None:
        self.stage, self.zone, self.settings, self.audit = stage, zone, settings, audit
        self.version = settings.config_version()
        self.storage = ZoneStorage.for_zone(settings, zone)
        self.store = SnapshotStore(self.storage, stage.commits, keep=settings.pipeline.keep_snapshots)
        self.timer = Timer()
        self.key = ""
        self.inputs: dict[str, Any] = {}  # what the manifest names as this run's input
        self.summary: dict[str, Any] = {"stage": stage.commits, "zone": zone}

    @property
    def input_store(self) -> SnapshotStore:
        """The snapshot store this stage reads."""
        if self.stage.reads is None:
            raise ConfigError(f"the chain declares stage {self.stage.name} as reading the landing, not a snapshot")
        return SnapshotStore(self.storage, self.stage.reads, keep=self.store.keep)

    def read_input(self, key: str | None) -> dict[str, Any]:
        """The manifest of the input snapshot `key` (None: the input store's CURRENT); this run's key follows."""
        manifest = self.input_store.resolve(key)
        self.audit.input = manifest_ref(manifest)
        reads = self.input_store.stage
        self.inputs = {reads: manifest["key"], f"{reads}_manifest_sha256": manifest_hash(manifest)}
        self._keyed(manifest_hash(manifest), input={reads: manifest["key"]})
        return manifest

    def read_landing(self, listing_hash: str, files: int) -> None:
        """A stage reading the landing: the listing is its input manifest, its hash names every
        file's path, size and mtime."""
        self.audit.input = {"stage": "landing", "sha256": listing_hash}
        self.inputs = {"listing_files": files}
        self._keyed(listing_hash, files=files)

    def _keyed(self, input_hash: str, **summary: Any) -> None:
        self.key = snapshot_key(self.stage.commits, input_hash, self.version)
        self.summary.update(key=self.key, **summary)

    def committed(self) -> dict[str, Any] | None:
        """This run's output, if a run with the same key committed it already."""
        return self.store.committed(self.key)

    def skip(self, done: dict[str, Any], audit_counts: dict[str, Any], **summary: Any) -> dict[str, Any]:
        """The summary of a run that found its output committed: on record, but nothing new, so
        its task ends skipped and publishes no asset event."""
        self.audit.output, self.audit.counts, self.audit.skipped = done, audit_counts, True
        return self.result(done, skipped="already committed", **summary)

    def begin(self) -> Staging:
        return self.store.begin(self.key)

    def commit(self, staging: Staging, fields: dict[str, Any], audit_counts: dict[str, Any]) -> dict[str, Any]:
        """Commit the staged output with its manifest (`fields`, plus its inputs and config version)."""
        manifest = self.store.commit(staging, {"inputs": self.inputs, "config_version": self.version, **fields})
        self.audit.output, self.audit.counts = manifest, audit_counts
        return manifest

    def result(self, manifest: dict[str, Any], **summary: Any) -> dict[str, Any]:
        return {**self.summary, **summary, "manifest": manifest, "durations": self.timer.durations}


@contextmanager
def stage_run(stage: Stage, zone: str, config: str | None = None) -> Iterator[StageRun]:
    """A run of `stage` in `zone`, audited when it ends (committed, skipped or failed with its kind)."""
    settings = load_settings(config) if config else get_settings()
    with audited(settings, stage.commits, zone) as audit:
        yield StageRun(stage, zone, settings, audit)


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Under the Jobs API RAY_ADDRESS names the cluster; without it (tests, a laptop shell) the
        # caller must have started one: never start a second, private cluster by accident.
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True, logging_level=logging.WARNING)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = True


def free_resources() -> dict[str, float]:
    """What the cluster has free now, to size actor pools by. Not its total: Serve replicas (the
    llama.cpp target holds a CPU) keep theirs, and a pool larger than the free CPUs waits forever."""
    import ray

    free = ray.available_resources()  # type: ignore[no-untyped-call]  # ray leaves it unannotated
    return {k: free.get(k, 0.0) for k in ("CPU", "GPU")}


def emit(summary: dict[str, Any]) -> None:
    """Print the run summary as the job's last log line (the manifest stays in storage)."""
    print(format_result(summary), flush=True)


def main(stage: Stage, description: str | None, run: Callable[[str, Any, str | None], dict[str, Any]]) -> None:
    """A stage job's command line: `--zone`, `--config`, and its input: `--input-key` for a stage
    reading a snapshot, `--run-time` for one reading the landing; then `run(zone, input, config)`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zone", required=True, help="the zone whose storage this job reads and writes")
    p.add_argument("--config", default=None, help="keel.yaml (default: $KEEL_CONFIG, ./keel.yaml, the example)")
    if stage.reads:
        p.add_argument("--input-key", default=None, help=f"the {stage.reads} snapshot to read (default: CURRENT)")
    else:
        p.add_argument("--run-time", required=True, help="the DAG run's logical time, stored on new documents")
    args = p.parse_args()
    init_ray()
    emit(run(args.zone, args.input_key if stage.reads else args.run_time, args.config))
