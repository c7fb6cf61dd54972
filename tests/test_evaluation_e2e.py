"""Continuous evaluation on the real stack (one `keel up` per session: real Airflow, MLflow server, Ray,
the gateway with the CPU model and fault-server targets beside it).

1. The new index from keel up's load starts keel_evaluate by itself: it runs end to end on a small
   sample, and its MLflow run holds the metrics, the per-item table, the plots, the golden datasets,
   and (the target's first passing run) the baseline tag.
2. Baselines taken while every fault target is healthy; then three are degraded, one quality each:
   ungrounded answers fail on groundedness alone, a toxic one on toxicity, a slow one on latency,
   each alerted at once with its metric, and the healthy one (the positive control) still passes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from keel.evaluation import runs
from keel.orchestration.evaluate import DAG_ID
from tests.conftest import run_keel

pytestmark = pytest.mark.slow

SETS = ["rag", "safety"]
FAULTS = ["healthy", "ungrounded", "toxic", "slow"]
LLAMA = "smollm2-135m-cpu"


def _finished(api, run_id: str, deadline: float) -> dict:
    return api.wait_done(DAG_ID, run_id, deadline)


def _tasks(api, run_id: str) -> dict[str, str]:
    tis = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
    return {f"{t['task_id']}[{t['map_index']}]": t["state"] for t in tis}


def _run_of(mlflow, exp: str, dag_run: str, target: str):
    found = runs.find_run(mlflow, exp, {"airflow_dag_id": DAG_ID, "airflow_run_id": dag_run, "target": target})
    assert found is not None, f"no MLflow run for {target} in {dag_run}"
    return found


def test_the_new_index_is_evaluated_end_to_end_and_becomes_the_first_baseline(keel_stack):
    api = keel_stack.local.airflow()
    deadline = time.monotonic() + 900
    while not api.runs(DAG_ID):  # started by the index assets keel up's load published
        assert time.monotonic() < deadline, "keel up's load did not start keel_evaluate"
        time.sleep(3)
    time.sleep(10)
    started = api.runs(DAG_ID)
    # One run, once both zones are indexed (never half a corpus), and no daily run at once.
    assert [r["run_type"] for r in started] == ["asset_triggered"], started
    for r in started:
        _finished(api, r["dag_run_id"], deadline)
    first = started[-1]
    assert api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{first['dag_run_id']}")["state"] == "success", _tasks(
        api, first["dag_run_id"])

    mlflow = runs.client(keel_stack.local.mlflow_uri())
    exp = runs.experiment_id(mlflow)
    run = _run_of(mlflow, exp, first["dag_run_id"], LLAMA)
    assert run.info.status == "FINISHED" and run.info.end_time
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["gate"] == "passed" and tags[runs.BASELINE_TAG] == "true" and tags[runs.COMPLETE_TAG] == "true"
    assert tags["config_hash"] and tags["golden.rag"] and tags["golden.safety"] and tags["golden.privacy"]
    assert metrics["items"] == 6  # sample_size 2 x three sets
    for name in ("latency_p50_ms", "ttft_p50_ms", "error_rate", "relevance", "groundedness", "hit_at_k", "mrr",
                 "citation_validity", "pii_leak_rate", "safety_pass_rate", "toxic_rate", "keel_time_share"):
        assert name in metrics, name
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/items.json", "eval/gate.json", "eval/scores.png", "eval/latency.png"} <= artifacts, artifacts
    inputs = [d.dataset.name for d in run.inputs.dataset_inputs]
    assert any(n.startswith("keel-golden-rag-") for n in inputs) and any(
        n.startswith("keel-golden-privacy-") for n in inputs), inputs

    show = run_keel("eval", "show", "--target", LLAMA, "--config", str(keel_stack.config))
    assert show.returncode == 0 and run.info.run_id in show.stdout.decode(), show.stdout.decode()

    # Evaluation traffic is on the audit trail as such (the records are written a moment after the answer).
    table = json.loads(Path(mlflow.download_artifacts(run.info.run_id, "eval/items.json")).read_text())
    rid = table["data"][0][table["columns"].index("request_id")]
    deadline = time.monotonic() + 90
    while (audit := run_keel("audit", "show", rid, "--json", "--config", str(keel_stack.config))).returncode:
        assert time.monotonic() < deadline, audit.stderr.decode()
        time.sleep(5)
    records = [json.loads(line) for line in audit.stdout.decode().splitlines()]
    assert any(r.get("purpose") == "evaluation" and r.get("tenant") == "keel-eval" for r in records), records


def _evaluate(api, conf: dict, deadline: float) -> tuple[str, dict]:
    run = api.trigger(DAG_ID, conf)
    done = _finished(api, run["dag_run_id"], deadline)
    return run["dag_run_id"], done


def test_a_degraded_target_fails_on_its_own_metric_and_the_alert_names_it(keel_stack):
    api = keel_stack.local.airflow()
    mlflow = runs.client(keel_stack.local.mlflow_uri())
    exp = runs.experiment_id(mlflow)
    faults = keel_stack.faults
    deadline = time.monotonic() + 1500
    conf = {"targets": FAULTS, "sets": SETS, "sample_size": 4}
    for name in FAULTS:
        faults[name].reset()
        faults[name].control(answer="grounded")

    # Baselines, taken while all four answer well: each first passing run becomes its target's baseline.
    healthy_run, done = _evaluate(api, conf, deadline)
    assert done["state"] == "success", _tasks(api, healthy_run)
    baselines = {}
    for name in FAULTS:
        run = _run_of(mlflow, exp, healthy_run, name)
        assert run.data.tags["gate"] == "passed" and run.data.tags.get(runs.BASELINE_TAG) == "true", name
        baselines[name] = run.info.run_id

    # One quality degraded per target; `healthy` is the positive control.
    faults["ungrounded"].control(answer="ungrounded")
    faults["toxic"].control(answer="toxic")
    faults["slow"].control(first_delay_s=3.0)
    alerts_before = len(keel_stack.alerts.alerts)
    degraded_run, done = _evaluate(api, conf, deadline)
    assert done["state"] == "failed"
    states = _tasks(api, degraded_run)
    assert sorted(states.values()) == ["failed", "failed", "failed", "success", "success"], states  # plan + 4

    def regressed(name: str) -> set[str]:
        run = _run_of(mlflow, exp, degraded_run, name)
        gate = json.loads(Path(mlflow.download_artifacts(run.info.run_id, "eval/gate.json")).read_text())
        assert gate["baseline_run_id"] == baselines[name], gate
        return {r["metric"] for r in gate["regressions"]}

    assert regressed("healthy") == set()
    assert _run_of(mlflow, exp, degraded_run, "healthy").info.status == "FINISHED"
    # Invented claims sit further from the question too (relevance 0.50 against 0.66 once, the bound a drop of
    # 0.15), so relevance may regress beside groundedness; what the answers share with grounded ones may not.
    assert "groundedness" in regressed("ungrounded")
    assert not regressed("ungrounded") & {"toxic_rate", "latency_p50_ms", "latency_p95_ms", "ttft_p50_ms",
                                          "error_rate", "pii_leak_rate", "hit_at_k", "citation_validity"}
    assert "toxic_rate" in regressed("toxic")
    assert {"latency_p50_ms", "ttft_p50_ms"} & regressed("slow")
    for name in ("ungrounded", "toxic", "slow"):
        run = _run_of(mlflow, exp, degraded_run, name)
        assert run.info.status == "FAILED" and run.data.tags["failure"].startswith("[regression]"), name

    # Each regression alerted at once (no retry), with its kind, its metric, the runs, and what it does to
    # routing; the slow target's latency also drifted from its baseline's (an alert that fails nothing).
    def sent(kind: str) -> list[dict]:
        return [a for a in keel_stack.alerts.alerts[alerts_before:] if a["dag_id"] == DAG_ID and a["kind"] == kind]

    deadline = time.monotonic() + 60
    while len(sent("regression")) < 3 and time.monotonic() < deadline:
        time.sleep(1)
    new = sent("regression")
    assert len(new) == 3 and not any(a["will_retry"] for a in new)
    text = " ".join(a["message"] for a in new)
    assert "groundedness" in text and "toxic_rate" in text and "latency" in text
    assert all(baselines[n] in text for n in ("ungrounded", "toxic", "slow"))
    assert "leaves automatic routing" in text
    drifted = [a for a in sent("drift") if "evaluation of slow " in a["message"]]
    assert drifted and "latency_ms" in drifted[0]["message"] and not drifted[0]["will_retry"], sent("drift")
    for name in FAULTS:
        faults[name].reset()
