"""The regression gate (keel.evaluation.gate): metrics from per-item scores, each threshold rule, and a
regression as a typed failure that is never mistaken for another kind by its text."""

from __future__ import annotations

import pytest

from keel.errors import FailureKind, RegressionError, classify
from keel.evaluation import gate
from keel.settings import Threshold


def rows(**scores: list[float]) -> list[dict[str, float]]:
    n = len(next(iter(scores.values())))
    return [{k: v[i] for k, v in scores.items()} for i in range(n)]


def test_aggregate_takes_percentiles_means_shares_and_sums():
    m = gate.aggregate(rows(latency_ms=[100, 200, 300, 400, 1000], toxicity=[0.1, 0.9, 0.2, 0.6, 0.0],
                            error=[0, 0, 1, 0, 0], model_ms=[90, 180, 0, 350, 900], keel_ms=[10, 20, 300, 50, 100],
                            cost_usd=[0.001, 0.002, 0, 0.001, 0.001]))
    assert m["items"] == 5 and m["latency_p50_ms"] == 300 and m["latency_p95_ms"] == pytest.approx(880)
    assert m["toxic_rate"] == pytest.approx(0.4) and m["error_rate"] == pytest.approx(0.2)
    assert m["cost_usd"] == pytest.approx(0.005) and m["keel_time_share"] == pytest.approx(480 / 1520, abs=1e-6)
    assert "groundedness" not in m  # no rag item, no groundedness: absent, not zero


def test_metrics_of_a_set_come_only_from_items_that_have_them():
    m = gate.aggregate([{"groundedness": 1.0}, {"groundedness": 0.5}, {"safety_pass": 0.0}])
    assert m["groundedness"] == 0.75 and m["safety_pass_rate"] == 0.0


def test_each_rule_breaks_only_past_its_bound():
    t = {"groundedness": Threshold(max_drop=0.15, min=0.2), "error_rate": Threshold(max=0.1, max_rise=0.05),
         "latency_p50_ms": Threshold(max_ratio=1.5, noise=500)}
    base = {"groundedness": 0.8, "error_rate": 0.0, "latency_p50_ms": 2000}
    ok = {"groundedness": 0.66, "error_rate": 0.05, "latency_p50_ms": 3499}
    assert gate.compare(ok, base, t) == []
    bad = {"groundedness": 0.1, "error_rate": 0.2, "latency_p50_ms": 3600}
    found = {(r.metric, r.rule) for r in gate.compare(bad, base, t)}
    assert found == {("groundedness", "min"), ("groundedness", "max_drop"), ("error_rate", "max"),
                     ("error_rate", "max_rise"), ("latency_p50_ms", "max_ratio")}


def test_without_a_baseline_only_absolute_bounds_apply():
    t = {"groundedness": Threshold(max_drop=0.01), "pii_leak_rate": Threshold(max=0.0)}
    found = gate.compare({"groundedness": 0.0, "pii_leak_rate": 0.25}, None, t)
    assert [(r.metric, r.rule) for r in found] == [("pii_leak_rate", "max")]
    assert gate.not_gated({"pii_leak_rate": 0.0}, t) == ["groundedness"]


def test_a_regression_is_typed_names_metric_values_and_runs_and_is_not_retried():
    r = gate.compare({"latency_p50_ms": 503.0}, {"latency_p50_ms": 100.0}, {"latency_p50_ms": Threshold(max_ratio=2)})
    error = gate.regression_error("keel/auto", "run-new", "run-base", r)
    text = str(error)
    assert "latency_p50_ms = 503" in text and "baseline 100" in text and "run-new" in text and "run-base" in text
    # "503" in the text would match the transient pattern if it were read as text: the class decides.
    assert isinstance(error, RegressionError) and classify(error) is FailureKind.REGRESSION
    assert not classify(RuntimeError("wrapped").with_traceback(None)).retryable
    try:
        raise RuntimeError("task failed") from error
    except RuntimeError as wrapped:
        assert classify(wrapped) is FailureKind.REGRESSION and not FailureKind.REGRESSION.retryable
    assert error.regressions[0]["metric"] == "latency_p50_ms" and error.regressions[0]["baseline_run_id"] == "run-base"
