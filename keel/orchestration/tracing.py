"""One trace per finished DAG run in MLflow Tracing (experiment `keel-traces`), built from Airflow's own
records once the run has ended: a root span for the run and one child span per task instance.

Airflow calls the listener hooks below where a run's state changes (the scheduler; `airflow dags test`'s own
loop; the API server when a person sets a run's state). They read the run's task instances in the caller's
session, build the trace and put it on the exporter's queue: no network I/O on the caller's thread, one
query, and nothing raised into Airflow (a failure is logged by its type and counted). The exporter's thread
sends it; at exit it flushes what is queued (`airflow dags test` exits right after the run).

A trace holds ids, states, counts and timings only: never a run's conf, a task's params, XCom or a
document's words. Its tags find it: tag.`keel.run_id` = '<run_id>' in mlflow.search_traces.

The plugin is registered by the `airflow.plugins` entry point in pyproject.toml, so every Airflow started
from Keel's venv loads it, whatever its AIRFLOW_HOME.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

from keel.telemetry.spans import AttrValue, SpanRecord, TraceRecord

if TYPE_CHECKING:
    from keel.telemetry.otlp import Exporter

log = logging.getLogger("keel.orchestration")

KIND = "dag_run"
SERVICE = "keel-airflow"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Airflow's `msg` for a run's end (models/dagrun.py, jobs/scheduler_job_runner.py); the API server's
# "Dag Run's state was manually set to ..." becomes "manual". Anything else is "other": never free text.
REASONS = frozenset({"success", "task_failure", "all_tasks_deadlocked", "timed_out"})
FAILED = "failed"

counts: Counter[str] = Counter()  # this process's traces: exported, dropped, failed (also Airflow's metrics)


def dag_run_trace(dag_run: Any, task_instances: Iterable[Any], msg: str | None = None) -> TraceRecord:
    """The trace of a finished run, from anything with a DagRun's attributes (dag_id, run_id, run_type,
    state, logical_date, queued_at, start_date, end_date) and a TaskInstance's (task_id, map_index,
    try_number, state, operator, queued_dttm, start_date, end_date)."""
    tis = list(task_instances)
    state = _text(dag_run.state)
    end = _ns(dag_run.end_date) or max((_ns(ti.end_date) or 0 for ti in tis), default=0) or time.time_ns()
    start = _ns(dag_run.start_date) or _ns(dag_run.queued_at) or end
    attrs: dict[str, AttrValue] = {
        "dag_id": str(dag_run.dag_id), "run_id": str(dag_run.run_id), "run_type": _text(dag_run.run_type),
        "state": state, "tasks": len(tis),
        **{f"tasks.{s}": n for s, n in sorted(Counter(_text(ti.state) for ti in tis).items())},
    }
    if dag_run.logical_date is not None:  # Airflow 3: a manual or asset-triggered run may have none
        attrs["logical_date"] = _utc(dag_run.logical_date).isoformat()
    if msg is not None:
        attrs["reason"] = msg if msg in REASONS else "manual" if "manually set" in msg else "other"
    root = SpanRecord(str(dag_run.dag_id), start, end, attributes=attrs, error=FAILED if state == FAILED else None)
    tags = {"keel.kind": KIND, "keel.dag_id": str(dag_run.dag_id), "keel.run_id": str(dag_run.run_id)}
    children = sorted((_task_span(ti, root.span_id, end) for ti in tis), key=lambda c: (c.start_ns, c.name))
    return TraceRecord([root, *children], tags)


def _task_span(ti: Any, parent: bytes, run_end: int) -> SpanRecord:
    """queued → start → end of the task's latest try; one that never ran (upstream failed, skipped by a
    trigger rule) is an instant at its end, or the run's."""
    queued, started, ended = _ns(ti.queued_dttm), _ns(ti.start_date), _ns(ti.end_date)
    end = ended or run_end
    start = min(queued or end, started or end, end)
    state, map_index = _text(ti.state), int(ti.map_index)
    attrs: dict[str, AttrValue] = {"task_id": str(ti.task_id), "map_index": map_index,
                                   "try_number": int(ti.try_number or 0), "state": state}
    if ti.operator:
        attrs["operator"] = str(ti.operator)
    if queued and started:
        attrs["queued_s"] = max(0, started - queued) / 1e9
    if started and ended:
        attrs["run_s"] = max(0, ended - started) / 1e9
    name = str(ti.task_id) if map_index < 0 else f"{ti.task_id}[{map_index}]"
    return SpanRecord(name, start, end, parent_id=parent, attributes=attrs,
                      error=FAILED if state == FAILED else None)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t  # Airflow stores UTC


def _ns(t: datetime | None) -> int | None:
    """Unix nanoseconds, exact to the microsecond (a float timestamp would round)."""
    return None if t is None else (_utc(t) - EPOCH) // timedelta(microseconds=1) * 1000


def _text(v: Any) -> str:
    return "none" if v is None else str(getattr(v, "value", v))  # str enums; a TI not yet scheduled has None


# -- Airflow's side ---------------------------------------------------------------------------------

_lock = threading.Lock()
_exporter: tuple[int, Exporter | None] | None = None  # (pid it was made in, it): a forked child makes its own


def _exporter_now() -> Exporter | None:
    global _exporter
    with _lock:
        if _exporter is None or _exporter[0] != os.getpid():
            from keel.settings import get_settings
            from keel.telemetry.otlp import exporter_for

            _exporter = (os.getpid(), exporter_for(get_settings(), SERVICE, on_count=_count))
        return _exporter[1]


def _count(outcome: str, n: int) -> None:
    counts[outcome] += n
    try:
        from airflow.observability import stats

        stats.incr(f"keel.dag_run_traces.{outcome}", n)  # to StatsD/OTel where Airflow's metrics are on
    except Exception:  # noqa: BLE001, S110 - a metric is never worth an error in the scheduler
        pass


def export(dag_run: Any, msg: str | None = None) -> None:
    """Queue the trace of a run that has just ended; never raises."""
    try:
        exporter = _exporter_now()
        if exporter is None:  # tracing off, or no MLflow server to send to
            return
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy.orm import object_session

        # The caller's session (the scheduler's, mid-transaction) sees the states it is about to commit.
        session = object_session(dag_run)
        with nullcontext(session) if session is not None else create_session() as s:
            tis = DagRun.fetch_task_instances(dag_id=dag_run.dag_id, run_id=dag_run.run_id, session=s)
            trace = dag_run_trace(dag_run, tis, msg)
        exporter.submit(trace)
    except Exception as e:  # noqa: BLE001 - a trace is never worth the scheduler's loop
        _count("failed", 1)
        # The type only: a database error's text can carry its statement and parameters.
        log.warning("keel: no trace for DAG run %s: %s", getattr(dag_run, "run_id", "?"), type(e).__name__)


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    export(dag_run, msg)


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    export(dag_run, msg)


class DagRunTraces(AirflowPlugin):
    name = "keel_dag_run_traces"
    listeners: list[ModuleType | object] = [sys.modules[__name__]]  # this module's two hooks
