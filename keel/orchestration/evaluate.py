"""The evaluation DAG, `keel_evaluate` (its one DAG file: dags/keel_evaluate.py).

It runs daily and once every zone's index asset has updated (a new index is re-evaluated), and by hand
with parameters (Trigger DAG w/ config in the UI, or `keel eval run`): which targets or aliases,
which golden sets, how many items of each. The scheduled default (settings.evaluation) is
`keel/auto` and each target on a small seeded sample; the whole sets run on demand.

One mapped task per target, one at a time (`max_active_tis_per_dagrun=1`): a CPU model answers one
request at a time, and evaluation must not starve users of it. Each task submits the Ray job
`ray_jobs.evaluate` (it asks the gateway, scores, logs one MLflow run) and turns the gate's verdict
into the task's state: a regression fails the task with a `RegressionError` (kind `regression`: not
retried, alerted at once by the failure callback, naming the metric, the values and the runs).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from keel import alerts
from keel.errors import RegressionError
from keel.evaluation.evaluate import label
from keel.evaluation.golden import SETS
from keel.orchestration.stages import asset, daily_at, on_failure, zones_with_sources
from keel.settings import KeelSettings, config_path, get_settings

log = logging.getLogger("keel.orchestration")

DAG_ID = "keel_evaluate"
CRON = "0 4 * * *"  # daily, after the batch chain's midnight run has had time to index


def targets(settings: KeelSettings, asked: list[str]) -> list[str]:
    """Aliases and target names, "*" expanded to every configured target, in order, once each."""
    names = [t.name for t in settings.policy.targets]
    out: list[str] = []
    for a in asked:
        for name in names if a == "*" else [a]:
            if name not in out:
                out.append(name)
    return out


def jobs(settings: KeelSettings, asked: list[str], sets: list[str], variants: list[str]) -> list[dict[str, Any]]:
    """One evaluation per target or alias asked, on the sets asked; then one per prompt variant asked
    (ids like keel-rag@2; "*": every variant of each prompt whose pool holds more than one), each on the
    sets whose requests get that prompt: keel-rag's the rag set through keel/auto, an alias's the others
    through that alias."""
    out = [{"target": t, "sets": sets, "prompt": None} for t in targets(settings, asked)]
    if not variants:
        return out
    from keel.feedback import prompts

    pools = prompts.pools(settings.pipeline.mlflow_tracking_uri)
    wanted = [v.id for vs in pools.values() if len(vs) > 1 for v in vs] if "*" in variants else variants
    for vid in dict.fromkeys(wanted):
        name, _ = prompts.parse_id(vid)
        model = prompts.model_of(name)
        target, asks = ("keel/auto", [s for s in sets if s == "rag"]) if model == "keel/rag" else \
            (model, [s for s in sets if s != "rag"])
        if asks:
            out.append({"target": target, "sets": asks, "prompt": vid})
    return out


def build_dag(settings: KeelSettings) -> Any:
    from airflow.sdk import DAG, AssetAll, AssetOrTimeSchedule, Param, task

    ev = settings.evaluation
    indexes = [asset(settings, z, "index") for z in zones_with_sources(settings)]
    schedule: Any = daily_at(CRON)
    if indexes:
        # Every zone's index updated since the last run: keel up's load (both zones) starts one evaluation, on
        # the whole corpus; an evaluation on half an index would be a baseline of the wrong thing. A zone
        # whose index changes alone waits for the others or for the daily run, at most a day.
        schedule = AssetOrTimeSchedule(timetable=schedule, assets=AssetAll(*indexes))
    params = {
        "targets": Param(list(ev.targets), type="array", description='aliases or target names; "*": every target'),
        "sets": Param(list(ev.sets), type="array", items={"enum": list(SETS)}),
        "sample_size": Param(ev.sample_size, type="integer", minimum=0, description="items per set; 0: all"),
        "prompts": Param(["*"], type="array", description='system prompt variants (keel-rag@2); "*": every variant '
                         "of a prompt with more than one; a variant that regresses leaves its pool"),
    }
    doc = (f"**{DAG_ID}** evaluates targets on the golden sets through the gateway, logs each to MLflow "
           f"(experiment `keel-evaluation`) and fails on a regression against the target's baseline. "
           f"Daily (`{CRON}`) and when an index updates; by hand with `targets`, `sets`, `sample_size`.")
    # No start_date: a daily run waits for its next time instead of running at once when the DAG first
    # appears (keel up's load, whose new index starts an evaluation anyway).
    with DAG(dag_id=DAG_ID, schedule=schedule, catchup=False, max_active_runs=1, params=params,
             tags=["keel", "evaluation"], doc_md=doc,
             default_args={"retries": settings.pipeline.retries, "on_failure_callback": on_failure,
                           "on_retry_callback": on_failure}) as dag:

        @task(task_id="plan")
        def plan(**context: Any) -> list[dict[str, Any]]:
            p = context["params"]
            return jobs(get_settings(), list(p["targets"]), list(p["sets"]), list(p.get("prompts") or []))

        @task(task_id="evaluate", max_active_tis_per_dagrun=1, map_index_template="{{ job_label }}")
        def evaluate(job: dict[str, Any], **context: Any) -> dict[str, Any]:
            from airflow.sdk import get_current_context

            get_current_context()["job_label"] = label(job["target"], job["prompt"])  # type: ignore[typeddict-unknown-key]
            return run_evaluation(job, context)

        evaluate.expand(job=plan())
    return dag


def run_evaluation(job: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    """Body of one evaluate task: the Ray job, then the gate's verdict as the task's state."""
    from airflow.sdk.exceptions import AirflowFailException

    from keel.errors import classify
    from keel.orchestration.ray_jobs import run_job, submission_id

    settings = get_settings()
    ti, params = context["ti"], context["params"]
    tries = int(ti.try_number or 1)
    task = f"evaluate-{int(getattr(ti, 'map_index', -1) or 0)}"
    ids = [submission_id(ti.dag_id, task, ti.run_id, n) for n in range(1, tries + 1)]
    target, prompt = job["target"], job["prompt"]
    command = [settings.pipeline.job_python or sys.executable, "-m", "ray_jobs.evaluate", "--target", target,
               "--sets", ",".join(job["sets"]), "--sample-size", str(params["sample_size"]),
               "--dag-id", ti.dag_id, "--run-id", ti.run_id, *(["--prompt", prompt] if prompt else [])]
    env = {"KEEL_CONFIG": str(config_path().resolve()), "KEEL_HOME": str(settings.home)}
    if settings.pipeline.mlflow_tracking_uri:
        env["KEEL_PIPELINE__MLFLOW_TRACKING_URI"] = settings.pipeline.mlflow_tracking_uri
    try:
        result = run_job(settings.ray_address, command, job_id=ids[-1], earlier_ids=ids[:-1], env=env,
                         metadata={"airflow_dag_id": ti.dag_id, "airflow_run_id": ti.run_id,
                                   "target": label(target, prompt)})
    except Exception as e:
        if not classify(e).retryable:
            raise AirflowFailException(f"[{classify(e).value}] {e}") from e
        raise
    log.info("evaluation of %s: MLflow run %s, %s", label(target, prompt), result["run_id"],
             "passed" if result["passed"] else "REGRESSED")
    for name, value in sorted(result["metrics"].items()):
        log.info("  %-20s %12.4f", name, value)
    if result.get("drift"):  # informs, never fails the task: the gate has decided
        alerts.send(alerts.Alert(
            kind="drift", dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id, try_number=tries,
            will_retry=False, log_url=getattr(ti, "log_url", None),
            message=(f"evaluation of {target} drifted from its baseline run {result.get('baseline_run_id')} "
                     f"in MLflow run {result['run_id']}: {', '.join(result['drift'])} (PSI > "
                     f"{settings.evaluation.drift_psi}, KS p < {settings.evaluation.drift_ks_p}; eval/drift.png)"
                     )[:2000]), settings.pipeline.alert_webhook)
    if not result["passed"]:
        error = regression(label(target, prompt), result)
        if prompt:
            consequence = (f"prompt variant {result['retired']} left its pool: the gateway stops choosing it within "
                           f"feedback.refresh_s (`keel prompts restore` brings it back)" if result.get("retired")
                           else f"prompt variant {prompt} was not retired (see the job's log)")
            raise AirflowFailException(f"{error}. {consequence}") from error
        raise AirflowFailException(f"{error}. Routing: {routing_consequence(settings, target)}") from error
    return {k: result.get(k) for k in ("run_id", "target", "passed", "baseline_run_id", "items", "drift", "retired")}


def regression(target: str, result: dict[str, Any]) -> RegressionError:
    from keel.evaluation.gate import Regression, regression_error

    fields = Regression.__dataclass_fields__
    found = [Regression(**{k: v for k, v in r.items() if k in fields}) for r in result["regressions"]]
    return regression_error(target, result["run_id"], result.get("baseline_run_id"), found)


def routing_consequence(settings: KeelSettings, target: str) -> str:
    """For the regression's alert: whether the target now leaves automatic routing or keeps serving as
    the last eligible one (keel.evaluation.standing), from the standings the gateway reads too."""
    from keel.evaluation import standing

    if target not in {t.name for t in settings.policy.targets}:
        return f"{target} is an alias, not one target: routing is unchanged (each target is judged by its own runs)"
    now: dict[str, standing.Standing] = {}
    ev = settings.evaluation
    try:
        now = standing.read_once(settings.pipeline.mlflow_tracking_uri, settings.policy.targets, ev.canary_share,
                                 ev.canary_step)
    except Exception as e:  # noqa: BLE001 - the alert goes out anyway, saying what it could not read
        log.warning("standings not read for the alert: %s", e)
    return standing.consequence(settings.policy, target, now)
