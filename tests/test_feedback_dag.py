"""The keel_feedback DAG on real Airflow 3: what it declares (parsed by Airflow's own DagBag), and one run of it
(`airflow dags test`) through a real Ray head and a real MLflow server: retention, the report, each zone's
dataset published on its asset, and an unchanged dataset not published again."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from keel.feedback import dataset, report
from keel.feedback.store import open_zone
from keel.settings import load_settings
from keel.storage import ZoneStorage
from tests.support.services import BIN, ROOT, airflow_env, start_mlflow, write_config
from tests.test_feedback_dataset import _fill

AIRFLOW = str(BIN / "airflow")
DAY = 86400.0


def test_the_dag_declares_retention_report_and_a_dataset_asset_per_zone(tmp_path):
    cfg = write_config(tmp_path)
    code = (
        "import json; from airflow.dag_processing.dagbag import DagBag\n"
        f"b = DagBag(dag_folder={str(ROOT / 'dags' / 'keel_feedback.py')!r})\n"
        "d = b.dags['keel_feedback']\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in b.import_errors.items()},"
        " 'schedule': d.timetable.expression, 'catchup': d.catchup, 'start_date': str(d.start_date),"
        " 'params': sorted(d.params), 'max_active_runs': d.max_active_runs,"
        " 'tasks': {t.task_id: {'outlets': [[o.name, o.uri] for o in t.outlets],"
        " 'upstream': sorted(t.upstream_task_ids), 'retries': t.retries} for t in d.tasks}}))"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **airflow_env(tmp_path / "airflow", cfg)},
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    out = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert out["errors"] == {}
    assert out["schedule"] == "30 4 * * *" and out["catchup"] is False and out["start_date"] == "None"
    assert out["params"] == ["report_days"] and out["max_active_runs"] == 1
    storage = {z: str(tmp_path / "storage" / region) for z, region in (("us", "us-east-1"), ("eu", "eu-west-1"))}
    assert out["tasks"] == {
        **{f"expire_{z}": {"outlets": [], "upstream": [], "retries": 3} for z in storage},
        **{f"dataset_{z}": {"outlets": [[f"keel_{z}_feedback_dataset", f"file://{root}/feedback_dataset"]],
                            "upstream": [f"expire_{z}"], "retries": 3} for z, root in storage.items()},
        "report": {"outlets": [], "upstream": ["expire_eu", "expire_us"], "retries": 3},
    }


def test_a_daily_dag_first_seen_after_its_time_waits_for_the_next_day(monkeypatch):
    """keel_evaluate (04:00) and keel_feedback (04:30) on a stack started at 04:40: their first runs are
    tomorrow's. CronTriggerTimetable's default would run today's at once (within a tenth of a day)."""
    import datetime as dt

    import airflow.timetables.trigger as trigger
    from airflow.sdk import CronTriggerTimetable
    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable
    from airflow.timetables.base import TimeRestriction

    from keel.orchestration import evaluate, feedback
    from keel.orchestration.stages import daily_at

    now = dt.datetime(2026, 12, 5, 4, 40, tzinfo=dt.UTC)
    monkeypatch.setattr(trigger, "utcnow", lambda: now)

    def first_run(timetable) -> dt.datetime:  # as the scheduler reads the serialized DAG
        info = decode_timetable(encode_timetable(timetable)).next_dagrun_info(
            last_automated_data_interval=None, restriction=TimeRestriction(None, None, False))
        return info.run_after

    for cron in (evaluate.CRON, feedback.CRON):
        hour, minute = int(cron.split()[1]), int(cron.split()[0])
        assert first_run(daily_at(cron)) == dt.datetime(2026, 12, 6, hour, minute, tzinfo=dt.UTC)
        assert first_run(CronTriggerTimetable(cron, timezone="UTC")) < now  # the default: at once


def test_a_bad_config_fails_a_light_task_at_once_and_a_passing_fault_is_retried():
    from airflow.sdk.exceptions import AirflowFailException

    from keel.errors import ConfigError
    from keel.orchestration.feedback import failing_at_once

    with pytest.raises(AirflowFailException, match=r"^\[bug\] zone 'eu' is stored on S3"), failing_at_once():
        raise ConfigError("zone 'eu' is stored on S3 (s3://b/eu): its feedback needs a database in the zone")
    with pytest.raises(ConnectionResetError), failing_at_once():  # Airflow retries it
        raise ConnectionResetError("database closed the connection")


def _dags_test(env: dict) -> str:
    r = subprocess.run([AIRFLOW, "dags", "test", "keel_feedback"], env={**os.environ, **env}, capture_output=True,
                       timeout=900)
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0, out[-5000:]
    return out


@pytest.mark.slow
def test_a_run_expires_reports_and_publishes_each_zone_once(ray_head, tmp_path):
    svc, mlflow_uri = start_mlflow(tmp_path / "mlflow")
    try:
        port = int(ray_head.address.rsplit(":", 1)[1])
        cfg = write_config(tmp_path, dashboard_port=port, mlflow_tracking_uri=mlflow_uri)
        settings = load_settings(cfg)
        now = time.time()
        store = open_zone(settings, "us")
        try:  # r-expiring's retention has run out by the time the DAG runs
            _fill(store, ["r-up", "r-corrected", "r-down", "r-expiring"], now=now - 3 * DAY)
        finally:
            store.close()
        env = airflow_env(tmp_path / "airflow", cfg)
        subprocess.run([AIRFLOW, "db", "migrate"], env={**os.environ, **env}, check=True, capture_output=True,
                       timeout=300)
        out = _dags_test(env)
        assert "deleted 1 expired exchange(s)" in out and "[keel] submitted Ray job keel-dataset_us-" in out
        assert "nothing new for keel_eu_feedback_dataset" in out  # eu has no feedback: no version, no event

        manifest, lines = dataset.read(ZoneStorage.for_zone(settings, "us"))
        assert manifest["requests"] == [["demo", "r-up"], ["demo", "r-corrected"]] and len(lines) == 2
        with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as db:
            events = db.execute("SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"
                                ).fetchall()
        assert [(name, json.loads(extra)["version"]) for name, extra in events] == [
            ("keel_us_feedback_dataset", manifest["version"])]

        from mlflow.tracking import MlflowClient

        c = MlflowClient(mlflow_uri)
        [run] = c.search_runs([c.get_experiment_by_name(report.EXPERIMENT).experiment_id])
        assert run.data.metrics["n"] == 4 and run.data.metrics["expired.us.exchanges"] == 1
        assert run.data.tags["airflow_dag_id"] == "keel_feedback"

        # Again: nothing changed, so no new version and no second asset event.
        out = _dags_test(env)
        assert "nothing new for keel_us_feedback_dataset" in out
        with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as db:
            assert db.execute("SELECT count(*) FROM asset_event").fetchone() == (1,)
    finally:
        svc.stop()
