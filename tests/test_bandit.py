"""Thompson sampling over prompt variants: the arm arithmetic, and a simulation of the feedback loop.

The simulation runs the real `VariantBoard` on a fake clock: each request takes 0.05 s, the board
refreshes every 1 s (so it sees feedback up to 20 requests late, as a replica would), synthetic users
rate each answer up with their variant's true rate, and the ratings land in a count table the board
reads only when it refreshes. Measured over 1000 seeds (asserted here on fewer):

- A better variant (up-rate 0.75 against 0.5) wins: within 300 feedback events it has at least 80%
  of the last 100 requests in 998 runs of 1000 (median 100%; 985 within 200 events).
- An equally good one (0.6 against 0.6) keeps a fair share in expectation: over each 100 runs of
  500 events either variant had 48% to 54% of the traffic on average, and neither was ever driven
  out (the smaller share of a run was at least 1.2%, 5% or more in 95 runs of 100). One run's split
  is wide, though: Thompson sampling follows early luck between equal arms, and only 44% of runs
  ended between 30% and 70%.
"""

# ruff: noqa: S311 - seeded generators make the simulation reproducible; nothing here is a secret

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import pytest

from keel.feedback import bandit
from keel.feedback.bandit import Arm
from keel.feedback.prompts import RAG, RAG_PROMPT, Variant
from keel.feedback.variants import VariantBoard

A, B = Variant(RAG, 1, "variant A"), Variant(RAG, 2, "variant B")
STEP_S, REFRESH_S = 0.05, 1.0


class FixedPools:
    def pools(self) -> Mapping[str, Sequence[Variant]]:
        return {RAG: [A, B]}

    def close(self) -> None:
        pass


def simulate(seed: int, rates: Mapping[int, float], events: int) -> list[int]:
    """The version each of `events` requests got; every user rates their answer."""
    now = 0.0
    table: dict[tuple[str, int], Arm] = {}
    board = VariantBoard(FixedPools(), lambda: dict(table), REFRESH_S, rng=random.Random(seed),
                         clock=lambda: now, start=False)
    users = random.Random(seed + 10_000)
    board.refresh()
    refreshed, chosen = now, []
    for _ in range(events):
        now += STEP_S
        if now - refreshed >= REFRESH_S:
            board.refresh()
            refreshed = now
        v = board.choose(RAG)
        assert v is not None
        chosen.append(v.version)
        key = (v.prompt, v.version)
        table[key] = table.get(key, Arm()).add(1.0 if users.random() < rates[v.version] else 0.0)
    return chosen


def test_a_better_variant_wins_most_traffic_within_300_feedback_events() -> None:
    shares = [simulate(seed, {1: 0.75, 2: 0.5}, 300)[-100:].count(A.version) / 100 for seed in range(50)]
    assert sum(s >= 0.8 for s in shares) >= 49
    assert sum(shares) / len(shares) >= 0.95


def test_an_equally_good_variant_keeps_a_fair_share() -> None:
    shares = [simulate(seed, {1: 0.6, 2: 0.6}, 500).count(A.version) / 500 for seed in range(100)]
    assert 0.45 <= sum(shares) / len(shares) <= 0.55
    assert min(min(s, 1 - s) for s in shares) >= 0.01


def test_the_board_sees_feedback_only_when_it_refreshes() -> None:
    now = 100.0
    table: dict[tuple[str, int], Arm] = {}
    board = VariantBoard(FixedPools(), lambda: dict(table), REFRESH_S, rng=random.Random(1), clock=lambda: now,
                         start=False)
    assert board.public()["refreshed_s_ago"] is None
    board.refresh()
    table[(RAG, 1)] = Arm(30, 0)
    assert board.public()["prompts"][RAG][0]["alpha"] == 1.0  # not yet read
    now += 2.5
    board.refresh()
    view = board.public()
    assert view["refreshed_s_ago"] == 0.0 and view["error"] is None
    assert view["prompts"][RAG] == [
        {"id": "keel-rag@1", "version": 1, "alpha": 31.0, "beta": 1.0, "expected": 0.969},
        {"id": "keel-rag@2", "version": 2, "alpha": 1.0, "beta": 1.0, "expected": 0.5},
    ]
    now += 4
    assert board.public()["refreshed_s_ago"] == 4.0


def test_without_a_registry_keel_rag_is_its_built_in_prompt_and_aliases_have_none() -> None:
    board = VariantBoard(None, dict, REFRESH_S, start=False)
    board.refresh()
    assert board.choose(RAG) == Variant(RAG, 0, RAG_PROMPT)
    assert board.choose(RAG).id == "keel-rag@builtin"  # type: ignore[union-attr]
    assert board.choose("keel-auto") is None and board.choose("keel-nope") is None
    assert board.public()["prompts"]["keel-auto"] == []


def test_a_failed_read_keeps_the_last_and_says_so() -> None:
    class Flaky(FixedPools):
        down = False

        def pools(self) -> Mapping[str, Sequence[Variant]]:
            if self.down:
                raise ConnectionError("mlflow unreachable")
            return super().pools()

    source, table = Flaky(), {(RAG, 2): Arm(5, 1)}
    board = VariantBoard(source, lambda: table, REFRESH_S, start=False)
    board.refresh()
    source.down = True
    table = {(RAG, 2): Arm(9, 1)}
    board.refresh()
    assert board.error == "prompts: ConnectionError: mlflow unreachable"
    assert [v["id"] for v in board.public()["prompts"][RAG]] == ["keel-rag@1", "keel-rag@2"]
    assert board.public()["prompts"][RAG][1]["alpha"] == 10.0  # the counts still refreshed
    source.down = False
    board.refresh()
    assert board.error is None


def test_arm_arithmetic() -> None:
    arm = Arm().add(bandit.score("up")).add(bandit.score("down")).add(bandit.score(0.25))
    assert arm == Arm(1.25, 1.75)
    assert (arm.alpha, arm.beta) == (2.25, 2.75)
    assert bandit.expected(Arm()) == 0.5
    assert bandit.expected(Arm(8, 0)) == 0.9
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            bandit.score(bad)
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            Arm().add(bad)
    with pytest.raises(ValueError, match="not meh"):
        bandit.score("meh")


def test_choose_follows_the_posteriors() -> None:
    rng = random.Random(7)
    arms = {"strong": Arm(90, 10), "weak": Arm(10, 90)}
    assert {bandit.choose(arms, rng) for _ in range(200)} == {"strong"}
    even = {"a": Arm(), "b": Arm()}
    picks = [bandit.choose(even, rng) for _ in range(2000)]
    assert 0.45 <= picks.count("a") / len(picks) <= 0.55
    with pytest.raises(ValueError, match="no arms"):
        bandit.choose({}, rng)


def test_ties_go_to_the_first_arm() -> None:
    class Constant(random.Random):
        def betavariate(self, alpha: float, beta: float) -> float:
            return 0.5

    assert bandit.choose({"first": Arm(), "second": Arm(5, 0)}, Constant()) == "first"
