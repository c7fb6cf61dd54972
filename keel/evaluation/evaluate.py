"""One evaluation: a target's answers to the golden sets, scored in MLflow and gated against its baseline.

1. The golden items (a seeded sample, or whole sets) go through the running gateway as any client's
   requests would (keel.evaluation.client), a bounded number at a time for the target.
2. `mlflow.genai.evaluate` scores the answers with Keel's scorers (keel.evaluation.scorers) in one
   MLflow run, which links the golden set versions it used as evaluation datasets; what is read off
   the answer (latency, tokens, cost, error) is measured in Keel's process into the item table, not
   logged as MLflow assessments.
3. Every item must hold every metric that applies to its set: a scorer that raised (MLflow keeps
   going, with an assessment carrying error_code SCORER_ERROR and one warning) or returned nothing
   fails the run, naming the scorer (EvaluationIncompleteError).
4. The metrics (keel.evaluation.gate) are compared with the baseline's; the run ends FINISHED when
   the gate passes, FAILED with the regressions otherwise, and both are logged with a per-item
   table and plots. A target's first passing run becomes its baseline (`keel eval promote` moves it).
5. Drift (keel.evaluation.drift): the target's items of the last `drift_window_days` days against its
   baseline's, logged in the run (tag `drift`, eval/drift.json, eval/drift.png); it never fails the run.

Idempotent: the run is found by its DAG run and target, so a retry of a completed evaluation returns
what it logged, and a retry of an interrupted one reuses its run, after deleting the traces of the
first try, so no item is counted twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from keel.errors import EvaluationIncompleteError, failure_reason
from keel.evaluation import gate, golden, runs
from keel.evaluation.client import Answer, GatewayClient
from keel.evaluation.golden import GoldenItem
from keel.settings import KeelSettings

log = logging.getLogger("keel.evaluation")


@dataclass
class Evaluation:
    """What one evaluation run measured and what the gate decided."""

    run_id: str
    target: str
    metrics: dict[str, float]
    regressions: list[gate.Regression] = field(default_factory=list)
    baseline_run_id: str | None = None
    not_gated: list[str] = field(default_factory=list)
    items: int = 0
    reused: bool = False  # found complete from an earlier try: nothing was asked or scored again
    phases: dict[str, float] = field(default_factory=dict)  # seconds: ask (the gateway), score, log
    drift: list[str] = field(default_factory=list)  # distributions that drifted from the baseline's (no verdict)
    drift_detail: dict[str, Any] = field(default_factory=dict)  # eval/drift.json: every distribution, or why none
    retired: str | None = None  # the prompt variant this regression took out of its pool

    @property
    def passed(self) -> bool:
        return not self.regressions

    def summary(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "target": self.target, "metrics": self.metrics, "passed": self.passed,
                "regressions": [asdict(r) for r in self.regressions], "baseline_run_id": self.baseline_run_id,
                "not_gated": self.not_gated, "items": self.items, "reused": self.reused, "phases": self.phases,
                "drift": self.drift, "drift_detail": self.drift_detail, "retired": self.retired}


@dataclass(frozen=True)
class Plan:
    """What to evaluate: one target (or alias), which sets, how many items of each."""

    target: str
    sets: Sequence[golden.SetName]
    sample_size: int
    ids: dict[str, str]  # the Airflow dag and run ids that name this run (with its label: `identity`)
    # A system prompt variant to evaluate ("keel-rag@2"): every item asks for it (x-keel-prompt). Its runs are
    # gated against the target's baseline (the variants in use), never become one, and a regression takes
    # the variant out of the pool (keel.feedback.prompts.retire).
    prompt: str | None = None

    @property
    def label(self) -> str:
        return label(self.target, self.prompt)

    @property
    def identity(self) -> dict[str, str]:
        """The tags that name this run (a retry finds it by them): its ids and its label as `target`."""
        return {**self.ids, "target": self.label}

    @property
    def scope(self) -> dict[str, str]:
        """What it asks (runs.SCOPE_TAGS): it is gated, and its drift measured, only against runs that asked
        the same."""
        return {"sets": ",".join(self.sets), "sample_size": str(self.sample_size)}


def label(target: str, prompt: str | None) -> str:
    """What a run evaluated, its `target` tag: the target, or the target with a prompt variant ("keel/auto
    keel-rag@2"), so a variant's runs are its own in drift windows, standings and retries."""
    return f"{target} {prompt}" if prompt else target


def sample(settings: KeelSettings, plan: Plan) -> tuple[list[golden.GoldenSet], list[tuple[str, GoldenItem]]]:
    folder = settings.home / settings.evaluation.golden_dir
    sets = [golden.load(folder, s) for s in plan.sets]
    seed = settings.evaluation.seed
    items: list[tuple[str, GoldenItem]] = [
        (str(gs.name), it) for gs in sets for it in gs.sample(plan.sample_size, seed)]
    return sets, items


def evaluate(settings: KeelSettings, plan: Plan, tracking_uri: str, client: GatewayClient, scorers: list[Any],
             ) -> Evaluation:
    """Run (or find) the evaluation `plan` describes; `scorers` are Keel's (keel.evaluation.scorers)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    c = runs.client(tracking_uri)
    exp = runs.experiment_id(c)
    sets, items = sample(settings, plan)
    found = runs.find_run(c, exp, plan.identity)
    if found is not None and found.data.tags.get(runs.COMPLETE_TAG) == "true":
        return _logged(found)
    datasets = runs.register(tracking_uri, sets)
    if found is not None:  # an interrupted try: its traces go, so no item counts twice
        _delete_traces(exp, found.info.run_id)
        run_id = found.info.run_id
    else:
        run_id = c.create_run(exp, run_name=_run_name(plan), tags=plan.identity).info.run_id
    _tag(c, run_id, settings, plan, sets)
    _link(c, run_id, datasets)

    # Asked first, then scored: here the CPU model takes every core, and scoring beside it (MLflow's
    # predict_fn pipeline, tried) slowed the model by 12% (benchmarks/evaluation.py: Keel 22% of the
    # model's time overlapped, 13% in turn). Scoring alone runs 8 items at a time: MLflow logs each
    # assessment in its own request, and overlapping that I/O took 60 answers from 22 to 18.5 s. An
    # item's scorers run one after another: MLflow's default, a pool of 10 threads per item, only
    # contends for the GIL (60 answers: 21-23 s with it, 17-18 s without).
    os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "8")
    os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS", "1")
    with mlflow.start_run(run_id=run_id, experiment_id=exp):
        try:  # the run ends FINISHED or FAILED whatever fails, asking included
            t0 = time.perf_counter()
            answers = ask_all(client, plan.target, items, plan.prompt)
            phases = {"ask_s": time.perf_counter() - t0}
            t0 = time.perf_counter()
            judged, measured = _split(scorers)
            mlflow.genai.evaluate(data=[_row(s, it, a) for (s, it), a in zip(items, answers, strict=True)],
                                  scorers=_mlflow_scorers(judged))
            rows = item_rows(exp, run_id, items, answers, measured)
            check_complete(rows, scorers)
            phases["score_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ev = _gate(c, exp, run_id, plan, settings, rows)
            if plan.prompt is not None and ev.regressions:
                ev.retired = _retire(tracking_uri, plan.prompt, run_id, ev.regressions)
            ev.drift, ev.drift_detail = _drift(c, exp, ev, settings, rows, plan.scope)  # informs, never raises
            _log(ev, rows)
            phases["log_s"] = time.perf_counter() - t0
            ev.phases = {k: round(v, 3) for k, v in phases.items()}
            mlflow.log_metrics({f"eval_{k}": v for k, v in ev.phases.items()})
        except Exception as e:
            mlflow.set_tag("failure", failure_reason(e))
            mlflow.end_run("FAILED")
            raise
        mlflow.set_tag(runs.COMPLETE_TAG, "true")
        if (plan.prompt is None and ev.baseline_run_id is None and ev.passed
                and runs.baseline(c, exp, plan.target, plan.scope) is None):
            # A target's first evaluation that holds its absolute bounds is its baseline until a person
            # promotes another: a new stack (or a new target) is gated from its second run on.
            mlflow.set_tags({runs.BASELINE_TAG: "true", "baseline_reason": "first passing evaluation"})
        if ev.regressions:
            mlflow.set_tag("failure", "[regression] " + "; ".join(str(r) for r in ev.regressions)[:5000])
        mlflow.end_run("FINISHED" if ev.passed else "FAILED")
    return ev


def ask_all(client: GatewayClient, model: str, items: Sequence[tuple[str, GoldenItem]],
            prompt: str | None = None) -> list[Answer]:
    """Every item's answer, in order, at most the target's bound in flight (the client enforces it too)."""
    width = client.s.concurrency_per_target.get(model, client.s.concurrency)
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="keel-eval") as pool:
        return list(pool.map(lambda si: client.ask(model, si[1], si[0], prompt), items))


def _retire(tracking_uri: str, variant: str, run_id: str, regressions: Sequence[gate.Regression]) -> str:
    """A variant that regressed leaves its prompt's pool: the gateway stops choosing it at its next refresh."""
    import mlflow

    from keel.feedback import prompts

    name, version = prompts.parse_id(variant)
    why = f"evaluation run {run_id} regressed: " + "; ".join(str(r) for r in regressions)
    prompts.retire(tracking_uri, name, version, why[:500])
    mlflow.set_tag("prompt_retired", "true")
    log.warning("prompt variant %s retired: %s", variant, why)
    return variant


def _row(set_name: str, item: GoldenItem, answer: Answer) -> dict[str, Any]:
    # No trace tags: MLflow sets each with a request of its own; the item's id and set are in its inputs.
    return runs.record(item, set_name) | {"outputs": answer}


def _split(scorers: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """(judged: MLflow's to run and log, measured: read off the answer here; keel.evaluation.scorers)."""
    from keel.evaluation.scorers import MEASURED

    return [s for s in scorers if s.name not in MEASURED], [s for s in scorers if s.name in MEASURED]


def _mlflow_scorers(scorers: list[Any]) -> list[Any]:
    from keel.evaluation.scorers import as_mlflow

    return list(as_mlflow(scorers))


def item_rows(exp: str, run_id: str, items: Sequence[tuple[str, GoldenItem]], answers: Sequence[Answer],
              measured: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """One row per item: what MLflow stored (its trace's assessments), the `measured` scorers' values
    (an error recorded as MLflow records a scorer's: `<name>.error`), and the answer's facts."""
    import mlflow

    by_item: dict[str, dict[str, Any]] = {}
    for trace in mlflow.search_traces(locations=[exp], run_id=run_id, return_type="list"):
        root = next((s for s in trace.data.spans if s.parent_id is None), None)
        item = (root.inputs or {}).get("id") if root is not None and isinstance(root.inputs, dict) else None
        if item is None:
            continue
        scores: dict[str, Any] = {}
        for a in trace.info.assessments or []:
            fb = getattr(a, "feedback", None)
            if fb is None:
                continue
            if fb.error is not None:
                scores[f"{a.name}.error"] = fb.error.error_message or fb.error.error_code
            else:
                scores[a.name] = fb.value
        by_item[item] = scores
    rows = []
    for (set_name, it), ans in zip(items, answers, strict=True):
        rows.append({"id": it.id, "set": set_name, "question": it.question, "answer": ans["text"][:500],
                     "prompt_chars": len(it.question), "answer_chars": len(ans["text"]),
                     "status": ans["status"], "error_code": ans["error"], "target": ans["target"],
                     "request_id": ans["request_id"], **by_item.get(it.id, {"_missing": True}),
                     **_measure(measured, set_name, it, ans)})
    return rows


def _measure(scorers: Sequence[Any], set_name: str, item: GoldenItem, answer: Answer) -> dict[str, Any]:
    record = runs.record(item, set_name)
    out: dict[str, Any] = {}
    for s in scorers:
        if set_name not in s.sets:
            continue
        try:
            out[s.name] = s(record["inputs"], answer, record.get("expectations") or {})
        except Exception as e:  # noqa: BLE001 - recorded, and the completeness check fails the run on it
            out[f"{s.name}.error"] = failure_reason(e)
    return out


def check_complete(rows: Sequence[dict[str, Any]], scorers: Sequence[Any]) -> None:
    """Every item holds every metric its set calls for; else the run fails, naming scorers and items."""
    missing: dict[str, list[str]] = {}
    for row in rows:
        for s in scorers:
            if row["set"] not in s.sets:
                continue
            if row.get(s.name) is None:
                why = row.get(f"{s.name}.error") or ("no trace" if row.get("_missing") else "no value")
                missing.setdefault(s.name, []).append(f"{row['id']} ({str(why).splitlines()[0][:200]})")
    if missing:
        names = "; ".join(f"scorer {n}: {len(v)} item(s), e.g. {v[0]}" for n, v in sorted(missing.items()))
        raise EvaluationIncompleteError(f"evaluation incomplete, a metric is missing: {names}")


def _gate(c: Any, exp: str, run_id: str, plan: Plan, settings: KeelSettings, rows: list[dict[str, Any]],
          ) -> Evaluation:
    metrics = gate.aggregate(rows)
    base = runs.baseline(c, exp, plan.target, plan.scope)
    base_metrics = base.data.metrics if base is not None and base.info.run_id != run_id else None
    thresholds = settings.evaluation.thresholds
    return Evaluation(run_id, plan.label, metrics, gate.compare(metrics, base_metrics, thresholds),
                      base.info.run_id if base_metrics is not None and base is not None else None,
                      gate.not_gated(metrics, thresholds), len(rows))


def _log(ev: Evaluation, rows: list[dict[str, Any]]) -> None:
    import mlflow
    import pandas as pd

    from keel.evaluation import plots

    mlflow.log_metrics(ev.metrics)
    mlflow.log_table(pd.DataFrame(rows), "eval/items.json")
    mlflow.log_dict(ev.summary(), "eval/gate.json")
    mlflow.set_tags({"gate": "passed" if ev.passed else "failed",
                     "baseline_run_id": ev.baseline_run_id or "none"})
    for name, fig in plots.figures(rows, ev.metrics, _baseline_metrics(ev)).items():
        mlflow.log_figure(fig, f"eval/{name}.png")


def _drift(c: Any, exp: str, ev: Evaluation, settings: KeelSettings, rows: list[dict[str, Any]],
           scope: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """The target's last window of items against its baseline's (keel.evaluation.drift), logged in the run:
    metrics drift_psi.<name> and drift_ks_p.<name>, tag `drift`, eval/drift.json and eval/drift.png.
    Returns (drifted names, the report). Never raises: the gate has decided, and drift does not change that."""
    import mlflow

    from keel.evaluation import drift, plots

    try:
        if ev.baseline_run_id is None:
            mlflow.set_tag("drift", drift.NO_BASELINE)
            return [], {"status": drift.NO_BASELINE}
        ev_settings = settings.evaluation
        window = _window_runs(c, exp, ev, scope, ev_settings.drift_window_days)
        base_rows = _items(c.get_run(ev.baseline_run_id))
        window_rows = [*rows, *(r for run in window for r in _items(run))]
        found = drift.compare(base_rows, window_rows, ev_settings.drift_psi, ev_settings.drift_ks_p)
        report = drift.Report(ev_settings.drift_psi, found, ev.baseline_run_id,
                              [ev.run_id, *(run.info.run_id for run in window)], ev_settings.drift_window_days)
        compared = [d for d in found if d.compared]
        mlflow.log_metrics({f"drift_{k}.{d.name}": v for d in compared
                            for k, v in (("psi", d.psi), ("ks_p", d.ks_p)) if v is not None})
        mlflow.log_dict(report.as_dict(), "eval/drift.json")
        if compared:
            mlflow.log_figure(plots.drift(base_rows, window_rows, compared), "eval/drift.png")
        mlflow.set_tag("drift", report.tag)
        if report.drifted:
            log.warning("drift of %s from its baseline %s: %s", ev.target, ev.baseline_run_id, report.tag)
        return report.drifted, report.as_dict()
    except Exception as e:  # noqa: BLE001 - a drift that cannot be computed is reported, the evaluation goes on
        reason = failure_reason(e)
        log.warning("drift of %s not computed: %s", ev.target, reason)
        mlflow.set_tag("drift", f"error: {reason}")
        return [], {"status": f"error: {reason}"}


def _window_runs(c: Any, exp: str, ev: Evaluation, scope: dict[str, str], days: int) -> list[Any]:
    """The target's other completed runs of the same scope started in the last `days` days (not its
    baseline), newest first."""
    from keel.evaluation.drift import MAX_WINDOW_RUNS

    since = int((time.time() - days * 86400) * 1000)
    where = " and ".join([f"tags.target = '{ev.target}'", f"tags.`{runs.COMPLETE_TAG}` = 'true'",
                          *(f"tags.{k} = '{v}'" for k, v in scope.items()), f"attributes.start_time >= {since}"])
    found = c.search_runs([exp], filter_string=where, max_results=MAX_WINDOW_RUNS,
                          order_by=["attributes.start_time DESC"])
    return [r for r in found if r.info.run_id not in (ev.run_id, ev.baseline_run_id)]


def _items(run: Any) -> list[dict[str, Any]]:
    """A run's per-item rows, from its eval/items.json (a pandas "split" table)."""
    import mlflow

    table = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/eval/items.json")
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def _baseline_metrics(ev: Evaluation) -> dict[str, float] | None:
    if ev.baseline_run_id is None:
        return None
    import mlflow

    return dict(mlflow.get_run(ev.baseline_run_id).data.metrics)


def _logged(run: Any) -> Evaluation:
    """A completed run's result as it was logged (a retried task asks and scores nothing again)."""
    import mlflow

    summary = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/eval/gate.json")
    return Evaluation(run.info.run_id, summary["target"], dict(summary["metrics"]),
                      [gate.Regression(**{k: v for k, v in r.items() if k in gate.Regression.__dataclass_fields__})
                       for r in summary["regressions"]],
                      summary["baseline_run_id"], summary["not_gated"], summary["items"], reused=True,
                      phases=summary.get("phases") or {}, drift=list(summary.get("drift") or []),
                      drift_detail=dict(summary.get("drift_detail") or {}))


def _tag(c: Any, run_id: str, settings: KeelSettings, plan: Plan, sets: Sequence[golden.GoldenSet]) -> None:
    tags = {"config_hash": settings.serving_config_hash(), **plan.scope,
            **{f"golden.{gs.name}": gs.version for gs in sets}}
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


def _link(c: Any, run_id: str, datasets: Sequence[Any]) -> None:
    from mlflow.entities import DatasetInput, InputTag

    c.log_inputs(run_id, [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", "golden")])
                          for ds in datasets])


def _delete_traces(exp: str, run_id: str) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    ids = [t.info.trace_id for t in mlflow.search_traces(locations=[exp], run_id=run_id, return_type="list")]
    if ids:
        MlflowClient().delete_traces(exp, trace_ids=ids)


def _run_name(plan: Plan) -> str:
    return f"{plan.label} {plan.identity.get('airflow_run_id', '')}".strip()
