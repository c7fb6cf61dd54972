"""Wall time of a RAG evaluation through the gateway, split into the model's time and Keel's own time.

    make up                                     # the stack, with the sample corpus indexed
    .venv/bin/python benchmarks/evaluation.py [--target smollm2-135m-cpu] [--items 60] [--config keel.yaml]

Runs one evaluation in this process (keel.evaluation.evaluate, the code the keel_evaluate DAG's Ray
job runs) on the RAG golden set against the running stack's gateway, one request at a time (the
CPU model answers one at a time), and logs it to the stack's MLflow like any other run.

Time is split per answer: the model's time is what the gateway reports (`keel.model_ms`: from the
request sent to the target to its last token); Keel's time is everything else: the gateway's own
work (auth, retrieval, routing, the guard, records) plus the client, then scoring and logging to
MLflow. Goal: Keel's time at most 10% of the model's on the shipped CPU model. Prints a table and
writes benchmarks/results/evaluation.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_report  # noqa: E402
from keel.evaluation import golden  # noqa: E402
from keel.evaluation.client import GatewayClient, evaluation_api_key, gateway_url  # noqa: E402
from keel.evaluation.evaluate import Plan, evaluate  # noqa: E402
from keel.evaluation.scorers import Models, keel_scorers  # noqa: E402
from keel.retrieval import Retriever  # noqa: E402
from keel.settings import load_settings  # noqa: E402
from keel.stack import LocalStack  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "evaluation.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m-cpu")
    p.add_argument("--items", type=int, default=60, help="RAG items (a seeded sample of the set)")
    p.add_argument("--config", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    settings = load_settings(a.config)
    uri = LocalStack(settings).mlflow_uri()
    rag = golden.load(settings.home / settings.evaluation.golden_dir, "rag")
    plan = Plan(a.target, ["rag"], a.items, {"airflow_dag_id": "benchmark",
                                             "airflow_run_id": f"bench-{int(time.time())}"})
    t0 = time.perf_counter()
    models = Models(settings)
    models.warm()
    scorers = keel_scorers(models, Retriever(settings))
    client = GatewayClient(settings, gateway_url(settings), evaluation_api_key(settings))
    try:
        ev = evaluate(settings, plan, uri, client, scorers)
    finally:
        client.close()
    wall = time.perf_counter() - t0

    m = ev.metrics
    model_s = m["model_ms_total"] / 1000
    gateway_keel_s = m["keel_ms_total"] / 1000  # per answer: latency seen by the client minus the model's
    phases = ev.phases
    setup_s = wall - sum(phases.values())  # loading the scorers' models, the golden sets, MLflow datasets
    keel_s = wall - model_s
    report = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "target": a.target, "items": int(m["items"]), "rag_set_version": rag.version, "mlflow_run": ev.run_id,
        "wall_s": round(wall, 2), "model_s": round(model_s, 2), "keel_s": round(keel_s, 2),
        "keel_share_of_model": round(keel_s / model_s, 4),
        "keel_breakdown_s": {"gateway_and_client": round(gateway_keel_s, 2), "scoring": phases.get("score_s"),
                             "logging": phases.get("log_s"), "setup": round(setup_s, 2)},
        "per_answer_ms": {"latency_p50": m["latency_p50_ms"], "ttft_p50": m["ttft_p50_ms"],
                          "model_p50": m["model_ms_p50"], "keel_p50": m["keel_ms_p50"]},
        "quality": {k: m[k] for k in ("relevance", "correctness", "f1", "groundedness", "hit_at_k", "mrr",
                                      "citation_validity", "error_rate") if k in m},
    }
    print(f"RAG evaluation of {a.target}: {report['items']} items, MLflow run {ev.run_id}")
    print(f"{'':28}{'seconds':>10}{'share of model':>16}")
    for name, sec in [("wall", wall), ("model (gateway-reported)", model_s), ("Keel, all", keel_s),
                      ("  gateway + client", gateway_keel_s), ("  scoring", phases.get("score_s", 0)),
                      ("  logging", phases.get("log_s", 0)), ("  setup", setup_s)]:
        print(f"{name:<28}{sec:>10.2f}{sec / model_s:>16.1%}")
    print("per answer p50 ms: " + ", ".join(f"{k} {v:.0f}" for k, v in report["per_answer_ms"].items()))
    print("quality: " + ", ".join(f"{k} {v:.3f}" for k, v in report["quality"].items()))
    verdict = "met" if keel_s <= 0.1 * model_s else "NOT met"
    print(f"goal: Keel <= 10% of model time: {verdict} ({keel_s / model_s:.1%})")
    write_report(report, a.out)


if __name__ == "__main__":
    main()
