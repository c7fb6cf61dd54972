"""Drift statistics (keel.evaluation.drift) on synthetic distributions: seeded draws, known answers. The
logging in an evaluation run, on real MLflow, is in test_evaluation.py."""

from __future__ import annotations

import math
import random

import pytest

from keel.evaluation import drift

LIMIT = 0.2  # settings.evaluation.drift_psi's default


def _draws(seed: int, n: int, mu: float = 0.0, sigma: float = 1.0) -> list[float]:
    rng = random.Random(seed)  # noqa: S311 - synthetic draws, not a secret
    return [rng.gauss(mu, sigma) for _ in range(n)]


def test_identical_distributions_have_not_drifted():
    base = _draws(0, 200)
    same = drift.compare_one("latency_ms", base, list(base), LIMIT)
    assert same.compared and same.psi == 0 and same.ks_statistic == 0 and same.ks_p == 1 and not same.drifted
    assert same.bins == 10  # 200 baseline items: deciles
    other = drift.compare_one("latency_ms", base, _draws(1, 200), LIMIT)  # a fresh sample of the same law
    assert other.psi is not None and other.psi < 0.1 and other.ks_p is not None and other.ks_p > 0.05
    assert not other.drifted


def test_a_shifted_distribution_has_drifted():
    base, shifted = _draws(0, 200), _draws(1, 200, mu=1.0)  # one standard deviation up
    d = drift.compare_one("answer_chars", base, shifted, LIMIT)
    assert d.drifted and d.psi is not None and d.psi > 0.5
    assert d.ks_statistic is not None and d.ks_statistic > 0.3 and d.ks_p is not None and d.ks_p < 1e-6
    # A tenth of a standard deviation is within the limit.
    assert not drift.compare_one("answer_chars", base, _draws(1, 200, mu=0.1), LIMIT).drifted


def test_psi_bins_at_the_baseline_quantiles_with_epsilon_for_empty_bins():
    base = [float(i) for i in range(1, 101)]  # 100 items: 10 bins of 10
    assert drift.cuts(base, 10) == pytest.approx([10.9 + 9.9 * i for i in range(9)])
    assert drift.shares(base, drift.cuts(base, 10)) == pytest.approx([0.1] * 10)
    # Every window item above the baseline's top cut: one bin holds all, nine are empty (EPSILON each).
    expected = 9 * (drift.EPSILON - 0.1) * math.log(drift.EPSILON / 0.1) + (1 - 0.1) * math.log(1 / 0.1)
    assert drift.psi(base, [500.0] * 30) == pytest.approx(expected)
    # A constant baseline (a rate that never moved) still has two bins: at or below it, and above.
    assert drift.cuts([0.0] * 20, 2) == [0.0]
    assert drift.psi([0.0] * 20, [0.0] * 20) == 0
    assert drift.psi([0.0] * 20, [0.0] * 10 + [1.0] * 10) > LIMIT


def test_too_few_items_on_either_side_are_not_compared_with_the_reason():
    few = drift.compare_one("groundedness", [0.9, 0.8], _draws(0, 50), LIMIT)
    assert not few.compared and not few.drifted and few.psi is None
    assert few.reason == "too few items: 2 in the baseline, 50 in the window (at least 5 on each side)"
    assert not drift.compare_one("groundedness", _draws(0, 50), [0.1] * 4, LIMIT).compared


def test_compare_reads_rows_and_names_every_measured_distribution():
    rows = [{"latency_ms": 100.0 + i, "answer_chars": 200 + i, "error": False, "groundedness": None,
             "relevance": float("nan"), "status": 200} for i in range(10)]
    late = [r | {"latency_ms": 900.0 + i} for i, r in enumerate(rows)]
    found = {d.name: d for d in drift.compare(rows, late, LIMIT)}
    # status is not a distribution; groundedness and relevance hold no number on either side: not measured.
    assert set(found) == {"latency_ms", "answer_chars", "error"}
    assert found["latency_ms"].drifted and not found["answer_chars"].drifted and found["error"].psi == 0
    assert drift.values([{"x": True}, {"x": 2}, {"x": "3"}, {"x": None}, {}], "x") == [1.0, 2.0]

    report = drift.Report(LIMIT, list(found.values()), "base", ["run"], 7)
    assert report.drifted == ["latency_ms"] and report.tag == "latency_ms"
    assert [d["name"] for d in report.as_dict()["distributions"]] == ["answer_chars", "latency_ms", "error"]
    assert drift.Report(LIMIT, [found["answer_chars"]]).tag == "none"
    assert drift.Report(LIMIT, [drift.compare_one("f1", [1.0], [1.0], LIMIT)]).tag == drift.NOT_COMPARED
