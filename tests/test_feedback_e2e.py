"""The feedback loop on the real stack (the session's one `keel up`): feedback over plain HTTP on the
gateway, then the keel_feedback DAG through Airflow and Ray: it is visible in MLflow (experiment
keel-feedback), and the zone's dataset asset holds the positively rated exchange, scrubbed, with none of
the planted values."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from keel.feedback import dataset, report
from keel.orchestration.feedback import DAG_ID
from keel.storage import ZoneStorage

pytestmark = pytest.mark.slow

PLANTED = ("Harriet Okafor", "harriet.okafor@example.org", "617-555-0148")


def test_feedback_over_http_reaches_mlflow_and_the_zones_dataset(keel_stack):
    base, key = f"http://{keel_stack.local.s.host}:{keel_stack.local.s.ports.gateway}", keel_stack.key
    headers = {"Authorization": f"Bearer {key}"}

    def ask(content: str, **h: str) -> str:
        r = httpx.post(base + "/v1/chat/completions", headers={**headers, **h}, timeout=120,
                       json={"model": "healthy", "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    liked = ask(f"I am {PLANTED[0]} ({PLANTED[1]}). Which plan suits a family of four?", **{"x-keel-data-class": "pii"})
    disliked = ask(f"Call me on {PLANTED[2]} about my bill.", **{"x-keel-data-class": "pii"})
    for rid, verdict in ((liked, "up"), (disliked, "down")):
        r = httpx.post(base + "/v1/feedback", headers=headers, timeout=60,
                       json={"request_id": rid, "rating": verdict, "comment": f"From {PLANTED[0]}, {PLANTED[2]}"})
        assert r.status_code == 201, r.text

    api = keel_stack.local.airflow()
    run = api.trigger(DAG_ID)
    done = api.wait_done(DAG_ID, run["dag_run_id"], time.monotonic() + 600)
    assert done["state"] == "success", api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}"
                                                       "/taskInstances")

    from keel.evaluation import runs

    mlflow = runs.client(keel_stack.local.mlflow_uri())
    exp = mlflow.get_experiment_by_name(report.EXPERIMENT)
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.airflow_run_id = '{run['dag_run_id']}'")
    assert found, "no keel-feedback run for the DAG run"
    metrics = found[0].data.metrics
    assert metrics["n"] >= 2 and metrics["up"] >= 1 and metrics["down"] >= 1 and metrics["comments"] >= 2, metrics
    assert metrics["target.healthy.n"] >= 2, metrics

    storage = ZoneStorage.for_zone(keel_stack.local.s, "us")
    manifest, lines = dataset.read(storage)
    assert [liked] == [rid for _, rid in manifest["requests"]]
    text = json.dumps(lines)
    assert not [v for v in PLANTED if v in text], text
    assert "[PERSON]" in text and "<PERSON_1>" not in text
