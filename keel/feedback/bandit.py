"""Thompson sampling over prompt variants, Beta-Bernoulli.

A rating is a score in [0, 1] (thumbs up 1, down 0, or a graded score). A variant's arm is the sum of
its scores and of their complements; its posterior is Beta(1 + successes, 1 + failures), so a variant
nobody rated yet draws from the uniform prior and gets explored. Each request draws one sample per
arm and takes the largest: a variant gets traffic in proportion to the chance that it is the best,
which moves traffic to a clearly better one fast and splits it between equally good ones.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

PRIOR_A = 1.0
PRIOR_B = 1.0
SCORES = {"up": 1.0, "down": 0.0}


@dataclass(frozen=True)
class Arm:
    """The feedback a variant got: the sum of its scores, and of one minus each."""

    successes: float = 0.0
    failures: float = 0.0

    @property
    def alpha(self) -> float:
        return PRIOR_A + self.successes

    @property
    def beta(self) -> float:
        return PRIOR_B + self.failures

    def add(self, score: float) -> Arm:
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"a feedback score is in [0, 1], not {score}")
        return Arm(self.successes + score, self.failures + 1.0 - score)


NO_FEEDBACK = Arm()


def score(rating: str | float) -> float:
    """A rating as a score: "up" 1, "down" 0, a number in [0, 1] as it is."""
    value = SCORES.get(rating, -1.0) if isinstance(rating, str) else float(rating)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a feedback score is in [0, 1], not {rating}")
    return value


def expected(arm: Arm) -> float:
    """The posterior mean: the variant's estimated up-rate."""
    return arm.alpha / (arm.alpha + arm.beta)


def choose(arms: Mapping[str, Arm], rng: random.Random) -> str:
    """One Thompson draw: a sample from each arm's posterior, the largest wins (the first on a tie)."""
    if not arms:
        raise ValueError("no arms to choose from")
    best, top = "", -1.0
    for name, arm in arms.items():
        sample = rng.betavariate(arm.alpha, arm.beta)
        if sample > top:
            best, top = name, sample
    return best
