"""Run a Keel Ray job through the Ray Jobs API and wait for it, streaming its log into the caller's.

A small, dependency-free replacement for the archived Astronomer Ray provider: the Airflow task
submits `python -m ray_jobs.<stage> ...` with a runtime env, copies the job's log into the task
log as it grows, fails when the job fails (with the failure kind read from the log), and returns
the job's run summary (its `KEEL_RESULT` line).

Submission ids are derived from the task instance, so a retried task whose earlier try's job is
still running attaches to that job instead of starting a duplicate.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from keel.errors import FailureKind, KeelError, classify
from keel.orchestration.job_result import RESULT_PREFIX, parse_result

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class RayJobError(KeelError):
    """A Ray job that failed, could not be reached or printed no summary: its kind is the one its
    log names (a Keel error's class, or a known foreign failure), so the task retries only what may pass."""

    code = "ray_job_failed"

    def __init__(self, message: str, kind: FailureKind) -> None:
        super().__init__(message)
        self.kind = kind


def submission_id(dag_id: str, task_id: str, run_id: str, try_number: int) -> str:
    digest = hashlib.sha256(f"{dag_id}\0{task_id}\0{run_id}".encode()).hexdigest()[:16]
    return f"keel-{task_id[:40]}-{digest}-try{try_number}"


def run_job(
    address: str,
    entrypoint: list[str],
    *,
    job_id: str,
    earlier_ids: Sequence[str] = (),
    env: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    poll_s: float = 1.0,
    timeout_s: float = 6 * 3600,
    log: Callable[[str], None] = lambda s: print(s, end="", file=sys.stdout, flush=True),
) -> dict[str, Any]:
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # unreachable (transient) or refused, e.g. a missing Ray auth token (bug: config)
        raise RayJobError(f"cannot use the Ray Jobs API at {address}: {e}", classify(e)) from e

    job = _attach(client, earlier_ids) or job_id
    if job == job_id and _status(client, job_id) is None:
        client.submit_job(
            entrypoint=shlex.join(entrypoint),
            submission_id=job_id,
            runtime_env={"env_vars": env or {}},
            metadata=metadata or {},
        )
        log(f"[keel] submitted Ray job {job_id}: {shlex.join(entrypoint)}\n")
    else:
        log(f"[keel] attached to Ray job {job}\n")

    shown, deadline = 0, time.monotonic() + timeout_s
    while True:
        status = _status(client, job)
        logs = client.get_job_logs(job)
        if len(logs) > shown:
            log(logs[shown:])
            shown = len(logs)
        if status in TERMINAL:
            break
        if time.monotonic() > deadline:
            client.stop_job(job)
            raise RayJobError(f"Ray job {job} ran past {timeout_s:.0f} s and was stopped", FailureKind.TRANSIENT)
        time.sleep(poll_s)

    info = client.get_job_info(job)
    log(f"[keel] Ray job {job} finished: {status}\n")
    if status != "SUCCEEDED":
        tail = "\n".join(logs.splitlines()[-40:])
        message = f"Ray job {job} {status}: {info.message or ''}".strip()
        raise RayJobError(f"{message}\n{tail}", classify(f"{info.message or ''}\n{tail}"))
    result = parse_result(logs)
    if result is None:
        raise RayJobError(f"Ray job {job} succeeded but printed no {RESULT_PREFIX.strip()} line", FailureKind.BUG)
    return result


def _status(client: Any, job: str) -> str | None:
    try:
        return str(client.get_job_status(job).value)
    except RuntimeError as e:  # "Job ... does not exist"
        if "does not exist" in str(e):
            return None
        raise


def _attach(client: Any, earlier_ids: Sequence[str]) -> str | None:
    """An earlier try's job that is still running (the worker died, the job did not)."""
    for job in earlier_ids:
        if _status(client, job) in ("PENDING", "RUNNING"):
            return job
    return None
