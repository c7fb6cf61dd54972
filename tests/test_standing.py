"""A target's standing from its evaluations, and what automatic routing does with it: pure code.

The gateway-level behaviour (two replicas reading MLflow, 0 of N requests to a regressed target,
a canary's share following its evaluations) is tests/test_quality_routing.py.
"""

from __future__ import annotations

import pytest

from keel.evaluation.standing import Standing, Verdict, consequence, history_needed, standing, standings
from keel.policy import ModelTarget
from keel.routing import Candidate, Exclusion, RouteRequest, plan
from keel.settings import load_settings
from tests.test_routing import stats, target

PASS, FAIL = Verdict("p", True), Verdict("f", False, why="groundedness 0 < min 0.63")
CLEARED = Verdict("c", False, cleared=True)


def canary(name="new"):
    return ModelTarget(name=name, kind="openai", zone="us", price_per_1k_input=0, price_per_1k_output=0,
                       tier="small", max_context=8192, options={"base_url": "http://x"}, canary=True)


def test_a_regression_excludes_until_a_pass_or_a_clear():
    t = target("m")
    assert standing(t, [], 0.1, 0.2).state == "serving"  # never evaluated: it was there before evaluation
    out = standing(t, [FAIL, PASS], 0.1, 0.2)
    assert out.state == "excluded" and out.share == 0 and "groundedness" in out.reason and out.run_id == "f"
    assert standing(t, [PASS, FAIL], 0.1, 0.2).state == "serving"
    cleared = standing(t, [CLEARED, PASS], 0.1, 0.2)
    assert cleared.state == "serving" and "cleared" in cleared.reason


def test_a_canary_enters_after_its_first_pass_and_grows_in_steps():
    c = canary()
    assert standing(c, [], 0.1, 0.2).share == 0  # no evidence: it waits
    shares = [standing(c, [PASS] * n, 0.1, 0.2).share for n in range(1, 7)]
    assert shares == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    assert standing(c, [PASS] * 6, 0.1, 0.2).state == "serving"
    assert standing(c, [FAIL, PASS, PASS, PASS], 0.1, 0.2).share == 0  # a regression takes it out
    assert standing(c, [PASS, FAIL, PASS, PASS], 0.1, 0.2).share == pytest.approx(0.1)  # and it starts again
    assert history_needed(0.1, 0.2) >= 6  # enough verdicts are read to see it through


REQ = RouteRequest(100, 100)


def test_a_regressed_target_is_left_out_of_automatic_routing_with_reason_quality():
    good = Candidate(target("good"), stats=stats(300))
    bad = Candidate(target("bad"), stats=stats(50), share=0.0, standing="regressed in run f: toxic_rate")
    r = plan([bad, good], REQ, "latency")
    assert r.ranked == ("good",) and r.excluded["bad"].reason is Exclusion.QUALITY
    assert "toxic_rate" in str(r.excluded["bad"])
    # Called by name it still answers, first.
    assert plan([bad, good], REQ, "latency", pinned="bad").ranked[0] == "bad"


def test_the_last_eligible_target_serves_even_when_it_regressed():
    bad = Candidate(target("only"), share=0.0, standing="regressed in run f")
    r = plan([bad], REQ, "latency")
    assert r.ranked == ("only",) and r.reason.startswith("fail-safe") and "only" not in r.excluded
    # Eligibility first: a healthy, in-zone target beats it; an unavailable one does not count.
    sick = Candidate(target("sick"), available=False)
    assert plan([bad, sick], REQ, "latency").ranked == ("only",)


def test_a_canary_takes_its_share_of_draws_and_is_named_in_the_reason():
    good = Candidate(target("good"), stats=stats(50))
    new = Candidate(canary(), stats=stats(300), share=0.3, standing="canary at 30% after 2 passing evaluation(s)")
    drawn = plan([good, new], RouteRequest(100, 100, draw=0.1), "latency")
    assert drawn.ranked == ("new", "good") and "canary new" in drawn.reason
    missed = plan([good, new], RouteRequest(100, 100, draw=0.5), "latency")
    assert missed.ranked == ("good",) and missed.excluded["new"].reason is Exclusion.CANARY
    share = sum(plan([good, new], RouteRequest(100, 100, draw=i / 1000), "latency").ranked[0] == "new"
                for i in range(1000)) / 1000
    assert share == pytest.approx(0.3)


def test_the_alert_says_whether_a_regressed_target_leaves_routing_or_keeps_serving():
    settings = load_settings(None)  # the example: one CPU model
    only = settings.policy.targets[0].name
    text = consequence(settings.policy, only, {})
    assert "keeps serving" in text and "fail-safe" in text and "zone us" in text
    two = settings.policy.model_copy(deep=True)
    two.targets.append(target("other", zone=settings.policy.targets[0].zone))
    assert "leaves automatic routing" in consequence(two, only, {})
    # ... unless the other one is itself excluded already, or runs in another zone.
    out = consequence(two, only, {"other": Standing("excluded", 0.0, "regressed")})
    assert "keeps serving" in out
    two.targets[-1] = target("other", zone="eu")
    assert "keeps serving" in consequence(two, only, {})


def test_standings_for_every_target():
    got = standings([target("a"), canary("b")], {"a": [FAIL]}, 0.1, 0.2)
    assert got["a"].state == "excluded" and got["b"].state == "excluded" and "canary" in got["b"].reason
