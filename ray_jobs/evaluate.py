"""Ray job: evaluate one target (or alias) on the golden sets through the running gateway.

    python -m ray_jobs.evaluate --target keel/auto [--sets rag,safety,privacy] [--sample-size 4]
                                [--prompt keel-rag@2] [--dag-id keel_evaluate --run-id <airflow run id>]

Submitted by the keel_evaluate DAG (keel.orchestration.evaluate). It asks, scores and logs to MLflow
(keel.evaluation.evaluate) and prints its summary as the last log line, the gate's verdict included:
the Airflow task turns a regression into a typed failure. A scorer that raised fails the job
(EvaluationIncompleteError), naming it.
"""

from __future__ import annotations

import argparse

from keel.errors import ConfigError
from keel.evaluation.client import GatewayClient, evaluation_api_key, gateway_url
from keel.evaluation.evaluate import Evaluation, Plan, evaluate
from keel.evaluation.golden import SETS
from keel.settings import KeelSettings, get_settings, load_settings
from ray_jobs._job import emit


def run(settings: KeelSettings, plan: Plan) -> Evaluation:
    from keel.evaluation.scorers import Models, keel_scorers
    from keel.retrieval import Retriever

    uri = settings.pipeline.mlflow_tracking_uri
    if not uri:
        raise ConfigError("pipeline.mlflow_tracking_uri is not set: evaluation runs are logged to MLflow")
    client = GatewayClient(settings, gateway_url(settings), evaluation_api_key(settings))
    models = Models(settings)
    models.warm()  # loaded (and the ONNX graph exported) before MLflow's scorer timeout starts counting
    judge = settings.evaluation.judge_target
    ask = (lambda prompt: client.complete(judge, prompt)) if judge else None
    try:
        return evaluate(settings, plan, uri, client, keel_scorers(models, Retriever(settings), ask))
    finally:
        client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="a target name or an alias (keel/auto, keel/fast ...)")
    p.add_argument("--sets", default=",".join(SETS), help="golden sets, comma-separated")
    p.add_argument("--sample-size", type=int, default=None, help="items per set (0: whole sets)")
    p.add_argument("--prompt", default=None, help="a system prompt variant to evaluate, e.g. keel-rag@2")
    p.add_argument("--dag-id", default="manual")
    p.add_argument("--run-id", default="manual")
    p.add_argument("--config", default=None, help="keel.yaml (default: $KEEL_CONFIG, ./keel.yaml, the example)")
    a = p.parse_args()
    settings = load_settings(a.config) if a.config else get_settings()
    sets = [s for s in a.sets.split(",") if s]
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise ConfigError(f"--sets: unknown golden sets {unknown}; known: {list(SETS)}")
    size = settings.evaluation.sample_size if a.sample_size is None else a.sample_size
    plan = Plan(a.target, sets, size,  # checked against SETS above
                {"airflow_dag_id": a.dag_id, "airflow_run_id": a.run_id}, a.prompt)
    emit(run(settings, plan).summary())


if __name__ == "__main__":
    main()
