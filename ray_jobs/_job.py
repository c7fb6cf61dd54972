"""What every Keel Ray job shares: arguments, Ray connection, the run summary protocol.

A job prints its run summary as the last line of its log, `KEEL_RESULT {json}`, which the
Airflow task parses from the Jobs API logs; it also stores it under `<zone>/runs/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

RESULT_PREFIX = "KEEL_RESULT "


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

    free = ray.available_resources()
    return {k: free.get(k, 0.0) for k in ("CPU", "GPU")}


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--zone", required=True, help="the zone whose storage this job reads and writes")
    p.add_argument("--config", default=None, help="keel.yaml (default: $KEEL_CONFIG, ./keel.yaml, the example)")
    if extra:
        extra(p)
    return p.parse_args()


def emit(summary: dict[str, Any]) -> None:
    """Print the run summary as the job's last log line (the manifest stays in storage)."""
    print(RESULT_PREFIX + json.dumps({k: v for k, v in summary.items() if k != "manifest"}, sort_keys=True), flush=True)


def parse_result(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None
