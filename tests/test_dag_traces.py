"""A DAG run's trace in MLflow Tracing (keel.orchestration.tracing): built from plain objects, and from a
real `airflow dags test` run through the plugin Airflow loads from Keel's entry point, to a real MLflow server."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from keel.orchestration.tracing import dag_run_trace
from keel.telemetry.otlp import encode
from tests.support.services import BIN, airflow_env, start_mlflow, write_config

T0 = datetime(2026, 12, 5, 4, 30, tzinfo=UTC)
SECRET = "hunter2-conf-value"


def _at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def _ti(task_id, state, queued, start, end, map_index=-1, try_number=1):
    return SimpleNamespace(task_id=task_id, map_index=map_index, try_number=try_number, state=state,
                           operator="_PythonDecoratedOperator", queued_dttm=queued, start_date=start, end_date=end,
                           params={"note": SECRET}, xcom=SECRET)  # what a trace must never carry


def test_a_failed_run_is_a_root_span_with_one_child_per_task_instance():
    run = SimpleNamespace(dag_id="keel_feedback", run_id="manual__2026-12-05", run_type="manual", state="failed",
                          logical_date=T0, queued_at=_at(-1), start_date=T0, end_date=_at(30), conf={"x": SECRET})
    tis = [_ti("report", "upstream_failed", None, None, _at(29)),
           _ti("expire_us", "success", _at(1), _at(2), _at(5)),
           _ti("dataset_us", "success", _at(6), _at(7), _at(9), map_index=1),
           _ti("dataset_us", "failed", _at(6), _at(8), _at(20), map_index=0, try_number=4)]
    trace = dag_run_trace(run, tis, "task_failure")

    root, *children = trace.spans
    assert trace.tags == {"keel.kind": "dag_run", "keel.dag_id": "keel_feedback", "keel.run_id": "manual__2026-12-05"}
    assert len(trace.trace_id) == 16 and root.parent_id is None and root.error == "failed"
    t0 = int(T0.timestamp()) * 10**9
    assert root.name == "keel_feedback" and (root.start_ns, root.end_ns) == (t0, t0 + 30 * 10**9)
    assert root.attributes == {
        "dag_id": "keel_feedback", "run_id": "manual__2026-12-05", "run_type": "manual", "state": "failed",
        "logical_date": "2026-12-05T04:30:00+00:00", "reason": "task_failure", "tasks": 4,
        "tasks.failed": 1, "tasks.success": 2, "tasks.upstream_failed": 1}
    assert [s.name for s in children] == ["expire_us", "dataset_us[0]", "dataset_us[1]", "report"]  # as queued
    assert all(s.parent_id == root.span_id for s in children) and len({s.span_id for s in trace.spans}) == 5
    expire, failed, mapped, never_ran = children
    assert expire.attributes == {"task_id": "expire_us", "map_index": -1, "try_number": 1, "state": "success",
                                 "operator": "_PythonDecoratedOperator", "queued_s": 1.0, "run_s": 3.0}
    assert (expire.start_ns, expire.end_ns) == (root.start_ns + 10**9, root.start_ns + 5 * 10**9)  # queued→end
    assert failed.error == "failed" and failed.attributes["try_number"] == 4 and failed.attributes["map_index"] == 0
    assert mapped.error is None and never_ran.error is None  # upstream_failed: its upstream's error, not its own
    assert never_ran.start_ns == never_ran.end_ns == root.start_ns + 29 * 10**9

    wire = encode([trace], "keel-airflow")
    statuses = {s.name: s.status.code for s in wire.resource_spans[0].scope_spans[0].spans}
    assert statuses == {"keel_feedback": 2, "expire_us": 1, "dataset_us[0]": 2, "dataset_us[1]": 1, "report": 1}
    assert SECRET.encode() not in wire.SerializeToString()  # no conf, params or XCom


def test_a_run_without_logical_date_or_dates_still_has_a_trace_and_a_manual_end_is_named_so():
    run = SimpleNamespace(dag_id="d", run_id="r", run_type="asset_triggered", state="success", logical_date=None,
                          queued_at=None, start_date=None, end_date=_at(10))
    trace = dag_run_trace(run, [_ti("t", None, None, None, None)], "Dag Run's state was manually set to `success`.")
    root, child = trace.spans
    assert "logical_date" not in root.attributes and root.attributes["reason"] == "manual"
    assert root.start_ns == root.end_ns == child.start_ns == child.end_ns and root.attributes["tasks.none"] == 1
    assert root.error is None and dag_run_trace(run, [], "some new text").spans[0].attributes["reason"] == "other"


def test_a_trace_that_cannot_be_built_is_logged_by_its_kind_and_counted_never_raised(monkeypatch, caplog):
    from keel.orchestration import tracing
    from keel.telemetry.otlp import Exporter

    exporter = Exporter("http://127.0.0.1:9/v1/traces", {}, service="keel-airflow")  # nothing listens there
    monkeypatch.setattr(tracing, "_exporter", (os.getpid(), exporter))
    before = tracing.counts["failed"]
    try:
        tracing.on_dag_run_failed(SimpleNamespace(dag_id="d", run_id="r", conf={"x": SECRET}), "task_failure")
    finally:
        exporter.close(0.1)
    assert tracing.counts["failed"] == before + 1 and exporter.exported + exporter.failed == 0
    assert "no trace for DAG run r: UnmappedInstanceError" in caplog.text and SECRET not in caplog.text


DAGS = """
from airflow.sdk import DAG, task

for dag_id, fail in (("keel_trace_ok", False), ("keel_trace_fail", True)):
    with DAG(dag_id, schedule=None, params={"note": "<secret>"}, default_args={"retries": 0}):
        @task
        def first(fail=fail):
            if fail:
                raise RuntimeError("the task fails")
            return [1, 2]

        @task
        def each(x):
            return x

        each.expand(x=first())
""".replace("<secret>", SECRET)


def test_airflow_dags_test_sends_each_run_s_trace_to_mlflow(tmp_path):
    svc, uri = start_mlflow(tmp_path / "mlflow")
    try:
        (tmp_path / "dags").mkdir()
        (tmp_path / "dags" / "trace_dags.py").write_text(textwrap.dedent(DAGS))
        env = {**os.environ, **airflow_env(tmp_path / "airflow", write_config(tmp_path, mlflow_tracking_uri=uri)),
               "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags")}
        airflow = str(BIN / "airflow")
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
        runs = {}
        for dag_id in ("keel_trace_ok", "keel_trace_fail"):
            t = time.monotonic()
            r = subprocess.run([airflow, "dags", "test", dag_id, "-c", f'{{"secret": "{SECRET}"}}'], env=env,
                               capture_output=True, timeout=300)
            out = r.stdout.decode() + r.stderr.decode()
            assert (r.returncode == 0) == (dag_id == "keel_trace_ok"), out[-4000:]
            assert "no trace for DAG run" not in out, out[-4000:]
            runs[dag_id] = _run_id(tmp_path / "airflow" / "airflow.db", dag_id)
            print(f"{dag_id}: airflow dags test {time.monotonic() - t:.1f} s")

        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("keel-traces").experiment_id
        # The exporter flushed at exit: the traces are there once `airflow dags test` has returned.
        [ok] = client.search_traces([exp], filter_string=f"tag.`keel.run_id` = '{runs['keel_trace_ok']}'")
        assert ok.info.tags["keel.kind"] == "dag_run" and ok.info.tags["keel.dag_id"] == "keel_trace_ok"
        assert ok.info.state.value == "OK"
        root = next(s for s in ok.data.spans if s.parent_id is None)
        assert root.name == "keel_trace_ok" and root.attributes["state"] == "success"
        assert root.attributes["tasks"] == 3 and root.attributes["tasks.success"] == 3
        assert sorted(s.name for s in ok.data.spans if s.parent_id == root.span_id) == ["each[0]", "each[1]",
                                                                                         "first"]

        [failed] = client.search_traces([exp], filter_string=f"tag.`keel.run_id` = '{runs['keel_trace_fail']}'")
        assert failed.info.state.value == "ERROR"
        spans = {s.name: s for s in failed.data.spans}
        assert spans["first"].status.status_code.value == "ERROR" and spans["first"].attributes["state"] == "failed"
        assert spans["each"].attributes["state"] == "upstream_failed"  # never expanded: one unmapped instance
        assert spans["keel_trace_fail"].attributes["reason"] == "task_failure"
        both = client.search_traces([exp], filter_string="tag.`keel.kind` = 'dag_run'")
        assert len(both) == 2 and SECRET not in str([t.to_json() for t in both])
    finally:
        svc.stop()


def _run_id(db, dag_id: str) -> str:
    import sqlite3

    with sqlite3.connect(db) as c:
        [(run_id,)] = c.execute("SELECT run_id FROM dag_run WHERE dag_id = ?", (dag_id,)).fetchall()
    return str(run_id)
