"""The DAGs on real Airflow 3: parsing, `airflow dags test` through a real Ray head, and (slow) a real
scheduler that fires the asset-triggered chain and logs every DAG run to a real MLflow server."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keel.orchestration.airflow_api import AirflowAPI, airflow_credentials
from tests.support.services import BIN, ROOT, Service, airflow_env, free_port, start_mlflow, write_config

AIRFLOW = str(BIN / "airflow")


def _small_landing(root: Path) -> Path:
    """A few real sample documents (the refund policy among them) to keep scheduler tests short."""
    land = root / "landing"
    land.mkdir()
    product = ROOT / "data/sample/us/product"
    for name in [*sorted(product.glob("*.md"))[:6], product / "refund-policy.md"]:
        shutil.copy(name, land / name.name)
    shutil.copy(ROOT / "data/sample/us/clinical/note-0001.txt", land / "note-0001.txt")
    return land


def _config(root: Path, ray_head, state: Path, **extra) -> Path:
    land = _small_landing(root)
    port = int(ray_head.address.rsplit(":", 1)[1])
    return write_config(root, dashboard_port=port, state_dir=state,
                        sources=[{"name": "docs", "uri": str(land), "zone": "us", "data_class": "phi"}], **extra)


def test_dags_parse_with_assets_in_zone_storage(tmp_path):
    cfg = write_config(tmp_path)
    code = (
        "import json; from airflow.dag_processing.dagbag import DagBag\n"
        f"b = DagBag(dag_folder={str(ROOT / 'dags')!r})\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in b.import_errors.items()},"
        " 'dags': {d: [str(getattr(t, 'outlets', '')) for t in dag.tasks] for d, dag in b.dags.items()},"
        " 'schedules': {d: str(dag.schedule) for d, dag in b.dags.items()}}))"
    )
    env = {**airflow_env(tmp_path / "airflow", cfg)}
    r = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, **env}, capture_output=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    out = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert out["errors"] == {}
    assert set(out["dags"]) == {"keel_ingest", "keel_scrub_us", "keel_scrub_eu", "keel_index_us", "keel_index_eu",
                                "keel_evaluate", "keel_feedback"}
    # Daily at 00:00 UTC, and never at once when the stack starts within a tenth of a day after it.
    assert "expression='0 0 * * *'" in out["schedules"]["keel_ingest"]
    assert "run_immediately=datetime.timedelta(0)" in out["schedules"]["keel_ingest"]
    # Evaluation: daily, or once every zone's index has updated.
    evaluate = out["schedules"]["keel_evaluate"]
    assert "AssetOrTimeSchedule" in evaluate and "AssetAll" in evaluate, evaluate
    assert "keel_us_index" in evaluate and "keel_eu_index" in evaluate, evaluate
    storage_us = str(tmp_path / "storage" / "us-east-1")
    assert f"file://{storage_us}/raw" in " ".join(out["dags"]["keel_ingest"])
    assert f"file://{storage_us}/scrubbed" in " ".join(out["dags"]["keel_scrub_us"])


def _dags_test(env: dict, dag_id: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([AIRFLOW, "dags", "test", dag_id], env={**os.environ, **env}, capture_output=True,
                          timeout=900)


def test_dags_test_runs_ray_jobs_and_streams_their_logs(ray_head, shared_state, tmp_path):
    import os

    cfg = _config(tmp_path, ray_head, shared_state)
    env = airflow_env(tmp_path / "airflow", cfg)
    subprocess.run([AIRFLOW, "db", "migrate"], env={**os.environ, **env}, check=True, capture_output=True, timeout=300)
    r = _dags_test(env, "keel_ingest")
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0, out[-4000:]
    assert "[keel] submitted Ray job keel-ingest_us-" in out  # the job's own log, in the task log
    assert "KEEL_RESULT" in out and "finished: SUCCEEDED" in out
    # The job's audit record names its Ray submission and the Airflow run, read from the Jobs API metadata.
    from keel import audit
    from keel.settings import load_settings
    from keel.storage import ZoneStorage

    [rec] = [r for r in audit.records(ZoneStorage.for_zone(load_settings(cfg), "us").audit_root())
             if r["kind"] == "transformation"]
    assert rec["job"] == "raw" and rec["status"] == "committed" and rec["job_id"].startswith("keel-ingest_us-")
    assert rec["airflow_dag_id"] == "keel_ingest" and rec["airflow_run_id"]
    # Again on the unchanged landing: the job finds its snapshot committed, so the task ends skipped and
    # Airflow records no asset event for it (the first run's event is the only one).
    r = _dags_test(env, "keel_ingest")
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0, out[-4000:]
    assert '"skipped": "already committed"' in out and "nothing new for keel_us_raw" in out
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as db:
        assert db.execute("SELECT count(*) FROM asset_event").fetchone() == (1,)
    r = _dags_test(env, "keel_scrub_us")
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0, out[-4000:]
    assert "Running Dataset" in out or "MapBatches(Scrubber)" in out  # Ray Data progress is visible


def test_a_failing_gate_fails_the_task_at_once_with_its_kind(ray_head, shared_state, tmp_path):
    """Data-quality failures are not retried, are alerted with their kind, and emit no asset event."""
    import os

    cfg = _config(tmp_path, ray_head, shared_state, max_quarantine_share=0.0, max_doc_bytes=1500)
    env = airflow_env(tmp_path / "airflow", cfg)
    subprocess.run([AIRFLOW, "db", "migrate"], env={**os.environ, **env}, check=True, capture_output=True, timeout=300)
    assert _dags_test(env, "keel_ingest").returncode == 0
    r = _dags_test(env, "keel_scrub_us")
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode != 0
    assert '"kind": "data_quality"' in out and '"will_retry": false' in out  # the alert
    assert "validate_us" in out and "failed validation" in out
    assert out.count("submitted Ray job keel-validate_us-") == 1  # no retry of a data-quality failure


@pytest.mark.slow
def test_scheduler_fires_the_asset_chain_and_logs_to_mlflow(ray_head, shared_state, tmp_path):
    """A real standalone Airflow: trigger only keel_ingest; the scrub and index DAGs must follow as
    asset-triggered runs, and each DAG run's summary must land in a real MLflow server."""
    mlflow, mlflow_url = start_mlflow(tmp_path / "mlflow")
    port = free_port()
    cfg = _config(tmp_path, ray_head, shared_state, mlflow_tracking_uri=mlflow_url)
    home = tmp_path / "airflow"
    af = Service("airflow", [AIRFLOW, "standalone"], airflow_env(home, cfg, port), tmp_path / "airflow.log")
    base = f"http://127.0.0.1:{port}"
    try:
        af.wait_http(f"{base}/api/v2/monitor/health", timeout=240)
        api = AirflowAPI(base, *airflow_credentials(home))
        deadline = time.monotonic() + 900
        for dag in ("keel_ingest", "keel_scrub_us", "keel_index_us"):
            api.wait_for_dag(dag, deadline)
            api.call("PATCH", f"/api/v2/dags/{dag}", {"is_paused": False})
        run = api.trigger("keel_ingest")
        api.wait_run("keel_ingest", run["dag_run_id"], deadline)
        for dag in ("keel_scrub_us", "keel_index_us"):
            runs = api.wait_any_run(dag, deadline)
            assert runs["run_type"] == "asset_triggered", runs
            assert runs["state"] == "success", runs
        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_url)
        exp = client.get_experiment_by_name("keel-pipeline")
        found = client.search_runs([exp.experiment_id], f"tags.airflow_run_id = '{run['dag_run_id']}'")
        assert len(found) == 1 and found[0].data.tags["airflow_dag_id"] == "keel_ingest"
        # The DAG's own daily run (unpaused, catchup off) may have ingested first: then this run's ingest
        # found its snapshot committed and logs only that it skipped, never counts it did not produce.
        ingests = client.search_runs([exp.experiment_id], "tags.airflow_dag_id = 'keel_ingest'")
        assert [r.data.metrics.get("ingest_us.documents") for r in ingests
                if r.data.tags.get("ingest_us.skipped") != "true"] == [8], ingests
        assert all(not r.data.metrics for r in ingests if r.data.tags.get("ingest_us.skipped") == "true")
        # Every run ends, and the one-run-per-DAG-run lock leaves nothing behind.
        from mlflow.entities import ViewType

        assert found[0].info.status == "FINISHED" and found[0].info.end_time
        assert [e.name for e in client.search_experiments(view_type=ViewType.ALL) if "lock" in e.name] == []
        downstream = client.search_runs([exp.experiment_id], "tags.airflow_dag_id = 'keel_index_us'")
        assert downstream and downstream[0].data.metrics["index_us.counts.documents"] == 8
    finally:
        af.stop()
        mlflow.stop()

