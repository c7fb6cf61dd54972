"""Routing policy: which model targets may serve a request, and in which order to try them.

Pure decisions over plain data, no I/O. The gateway describes the request (its size, what it
needs, where its data may go), says which targets' breakers let traffic through and what their
latency has been, and gets back a ranked list (the first is the choice, the rest are the
failover order) with the reason for every target left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from keel.policy import ModelTarget

Strategy = Literal["latency", "cost", "complexity", "blend"]
DEFAULT_MAX_TOKENS = 512  # the answer's length routing and rate limits assume when a request sets no max_tokens
# Model aliases a caller can name instead of a concrete target; None means the configured default.
ALIASES: dict[str, Strategy | None] = {
    "keel/auto": None,
    "keel/fast": "latency",
    "keel/cheap": "cost",
    "keel/smart": "complexity",
    "keel/rag": None,  # retrieval-grounded answer, routed like keel/auto
}


@dataclass(frozen=True)
class RouteRequest:
    prompt_tokens: int
    max_tokens: int
    needs: frozenset[str] = frozenset()  # capabilities the request uses: "tools", "response_format"
    # Residency hook: zones this request's data may go to; None means any (the compliance layer sets it).
    allowed_zones: frozenset[str] | None = None
    complexity: float = 0.0  # 0..1, from complexity_score()
    draw: float = 0.0  # uniform in [0, 1), drawn per request: which canary, if any, takes it


@dataclass
class LatencyStats:
    """Exponentially weighted moving averages of one target's latency and time to first token."""

    alpha: float = 0.2
    latency_s: float | None = None
    ttft_s: float | None = None

    def observe(self, latency_s: float | None = None, ttft_s: float | None = None) -> None:
        if latency_s is not None:
            self.latency_s = (latency_s if self.latency_s is None
                              else self.latency_s + self.alpha * (latency_s - self.latency_s))
        if ttft_s is not None:
            self.ttft_s = ttft_s if self.ttft_s is None else self.ttft_s + self.alpha * (ttft_s - self.ttft_s)

    @property
    def expected_s(self) -> float:
        """What a caller waits for the answer to start: TTFT where known, else whole latency.

        A target never measured counts as instant, so every new target gets tried once.
        """
        return self.ttft_s if self.ttft_s is not None else (self.latency_s or 0.0)


@dataclass(frozen=True)
class Candidate:
    """What routing knows of one target at decision time."""

    target: ModelTarget
    available: bool = True  # its circuit breaker lets a request through
    stats: LatencyStats = field(default_factory=LatencyStats)
    # Its standing from evaluation (keel.evaluation.standing): the share of automatic traffic it may take
    # (1 all, 0 none: it regressed, between: a canary) and why.
    share: float = 1.0
    standing: str = ""


@dataclass(frozen=True)
class Weights:
    latency: float = 0.5
    cost: float = 0.3
    complexity: float = 0.2


class Exclusion(StrEnum):
    """Why a target cannot serve a request; the gateway picks the caller's error by it."""

    RESIDENCY = "residency"
    CONTEXT = "context"
    CAPABILITY = "capability"
    HEALTH = "health"
    QUALITY = "quality"  # its latest evaluation regressed (automatic routing only)
    CANARY = "canary"  # a canary this request did not draw (automatic routing only)


@dataclass(frozen=True)
class Excluded:
    reason: Exclusion
    detail: str  # for people: "zone eu not allowed", "circuit open"

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"  # as the response and the audit trail show it


@dataclass(frozen=True)
class Route:
    ranked: tuple[str, ...]
    strategy: str
    reason: str
    excluded: dict[str, Excluded] = field(default_factory=dict)  # target -> why it cannot serve this request

    def excluded_text(self) -> dict[str, str]:
        return {name: str(why) for name, why in self.excluded.items()}


def plan(
    candidates: Sequence[Candidate],
    req: RouteRequest,
    strategy: Strategy,
    *,
    pinned: str | None = None,
    weights: Weights = Weights(),
    complexity_threshold: float = 0.5,
) -> Route:
    """Filter by health, context, capability and residency; then by evaluation; rank by strategy.

    `pinned` (a caller naming a concrete target) puts that target first whatever its evaluations
    said; the other eligible targets of its tier in good standing stay behind it as failover, so
    naming a model does not give up resilience.
    """
    eligible: list[Candidate] = []
    excluded: dict[str, Excluded] = {}
    for c in candidates:
        if (why := _exclusion(c, req)) is not None:
            excluded[c.target.name] = why
        else:
            eligible.append(c)
    want_large = req.complexity >= complexity_threshold
    if pinned is not None:
        named = next((c for c in candidates if c.target.name == pinned), None)
        why = excluded.get(pinned)
        if named is None or (why is not None and why.reason is not Exclusion.HEALTH):
            return Route((), "pinned", f"{pinned} cannot serve this request", excluded)
        # A named target whose breaker is open is skipped, not fatal: its tier-mates answer instead.
        first = [] if why else [named]
        rest = [c for c in eligible if c.target.name != pinned and c.target.tier == named.target.tier
                and c.share >= 1.0]
        ranked = first + _rank(rest, req, "blend", weights, want_large)
        reason = f"caller named {pinned}" + (f" ({why}: its tier answers)" if why else "")
        return Route(tuple(c.target.name for c in ranked), "pinned", reason, excluded)
    lead, members, note = _by_standing(eligible, excluded, req.draw)
    ranked = lead + _rank(members, req, strategy, weights, want_large)
    if not ranked:
        return Route((), strategy, "no eligible target", excluded)
    return Route(tuple(c.target.name for c in ranked), strategy,
                 note or _why(ranked[0], req, strategy, want_large), excluded)


def _by_standing(eligible: list[Candidate], excluded: dict[str, Excluded], draw: float,
                 ) -> tuple[list[Candidate], list[Candidate], str]:
    """Automatic routing by evaluation: (a canary this request drew, first; the targets to rank; a reason
    that replaces the strategy's when evaluation decided). Targets in good standing serve; a canary
    takes its share (the draw falls in it); a regressed target serves only when nothing else is
    eligible (the fail-safe: a regression never leaves a request without a target)."""
    members = [c for c in eligible if c.share >= 1.0]
    canaries = [c for c in eligible if 0.0 < c.share < 1.0]
    regressed = [c for c in eligible if c.share <= 0.0]
    drawn, edge = None, 0.0
    for c in canaries:
        edge += c.share
        if drawn is None and draw < edge:
            drawn = c
    note = ""
    if drawn is not None:
        note = f"canary {drawn.target.name} drawn ({drawn.share:.0%} of automatic traffic; {drawn.standing})"
    elif not members and canaries:  # only canaries left: they serve, whatever the draw
        members, canaries, note = canaries, [], "only canaries are eligible: they serve all of it"
    elif not members and regressed:
        names = ", ".join(c.target.name for c in regressed)
        members, regressed, note = regressed, [], (f"fail-safe: {names} regressed but no other target is eligible, "
                                                   "so it serves (and its evaluation alerted)")
    for c in canaries:
        if c is not drawn:
            excluded[c.target.name] = Excluded(Exclusion.CANARY, f"{c.standing}: not drawn for this request")
    for c in regressed:
        excluded[c.target.name] = Excluded(Exclusion.QUALITY, c.standing or "its latest evaluation regressed")
    return ([drawn] if drawn else []), members, note


def _exclusion(c: Candidate, req: RouteRequest) -> Excluded | None:
    t = c.target
    if req.allowed_zones is not None and t.zone not in req.allowed_zones:
        return Excluded(Exclusion.RESIDENCY, f"zone {t.zone} not allowed")
    if req.prompt_tokens + req.max_tokens > t.max_context:
        return Excluded(Exclusion.CONTEXT, f"{req.prompt_tokens}+{req.max_tokens} tokens > {t.max_context}")
    if missing := sorted(req.needs - set(t.supports)):
        return Excluded(Exclusion.CAPABILITY, f"no {', '.join(missing)}")
    if not c.available:
        return Excluded(Exclusion.HEALTH, "circuit open")
    return None


def uses_complexity(strategy: Strategy | str, pinned: str | None, weights: Weights) -> bool:
    """Whether the prompt's complexity can change the plan: its score costs tens of microseconds
    a request, so the gateway computes it only then (a named target ranks only its own tier)."""
    return pinned is None and (strategy == "complexity" or (strategy == "blend" and weights.complexity > 0))


def _cost(t: ModelTarget, req: RouteRequest) -> float:
    return (req.prompt_tokens * t.price_per_1k_input + req.max_tokens * t.price_per_1k_output) / 1000


def _rank(cs: list[Candidate], req: RouteRequest, strategy: Strategy, w: Weights, want_large: bool) -> list[Candidate]:
    def mismatch(c: Candidate) -> int:
        return int((c.target.tier == "large") != want_large)

    # Stable sorts: ties keep the configured order, so equal targets are tried as written.
    if strategy == "latency":
        return sorted(cs, key=lambda c: c.stats.expected_s)
    if strategy == "cost":
        return sorted(cs, key=lambda c: (_cost(c.target, req), c.stats.expected_s))
    if strategy == "complexity":
        return sorted(cs, key=lambda c: (mismatch(c), _cost(c.target, req), c.stats.expected_s))
    top_latency = max((c.stats.expected_s for c in cs), default=0.0) or 1.0
    top_cost = max((_cost(c.target, req) for c in cs), default=0.0) or 1.0
    return sorted(
        cs,
        key=lambda c: w.latency * c.stats.expected_s / top_latency
        + w.cost * _cost(c.target, req) / top_cost
        + w.complexity * mismatch(c),
    )


def _why(c: Candidate, req: RouteRequest, strategy: Strategy, want_large: bool) -> str:
    if strategy == "latency":
        return f"lowest expected latency {c.stats.expected_s * 1000:.0f} ms"
    if strategy == "cost":
        return f"lowest cost ${_cost(c.target, req):.6f}"
    tier = f"complexity {req.complexity:.2f} -> {'large' if want_large else 'small'} tier"
    if strategy == "complexity":
        return tier
    return f"best blend ({tier}, {c.stats.expected_s * 1000:.0f} ms, ${_cost(c.target, req):.6f})"


# -- complexity -------------------------------------------------------------------------------
# A cheap score of how hard a prompt is, to send easy ones to the small tier. It reads only the
# text (no model call), in microseconds. Signals, each measured on tests/data/complexity_labeled.jsonl:
# asking for reasoning, code, maths, several asks at once, or a long prompt raises it; a short
# factual or social message keeps it low.
_REASONING = re.compile(
    r"\b(why|how would you|explain|prove|derive|analy[sz]e|compare|contrast|trade-?offs?|evaluate|assess|critique|"
    r"review|design|architect\w*|debug|find the bug|optimi[sz]e|refactor|implement|algorithm|complexity|"
    r"step[- ]by[- ]step|walk through|reason\w*|plan|strateg\w*|pros and cons|implications?|justify|diagnos\w*|"
    r"differential|troubleshoot|estimate|solve|verify|risks?|propose|hypothes[ie]s)\b",
    re.I,
)
_CODE = re.compile(r"```|\bdef |\bclass |\bSELECT\b|\bfunction\b|=>|;\s*$|\{\s*$|\w+Error\b|\bGo\b|"
                   r"(?i:\b(regex|sql|python|java(script)?|bash)\b)", re.M)
_MATH = re.compile(r"\b(integral|derivative|gradient|equation|theorem|probability|expected value|matrix|eigen\w*|proof|"
                   r"irrational)\b|[=^∑∫√]\s*\w", re.I)
_WRITE = re.compile(r"\b(write|draft|compose|generate)\b.{0,40}\b(essay|report|story|program|script|function|proposal|"
                    r"article|analysis|plan|specification|spec|policy|query)\b", re.I)


def complexity_score(text: str) -> float:
    """0 (trivial) .. 1 (hard); the gateway sends >= complexity_threshold (0.5) to the large tier."""
    words = len(text.split())
    reasoning = len(_REASONING.findall(text))
    score = (0.35 + 0.15 * min(reasoning - 1, 2)) if reasoning else 0.0
    score += 0.35 if _CODE.search(text) else 0.0
    score += 0.35 if _MATH.search(text) else 0.0
    score += 0.35 if _WRITE.search(text) else 0.0
    score += min(0.2, 0.1 * max(0, text.count("?") - 1))
    score += 0.15 if words >= 15 else 0.0  # a prompt that needs many words to ask usually needs many to answer
    score += min(0.3, words / 1000)  # long context to digest
    if words < 8 and not _CODE.search(text):
        score -= 0.2
    return max(0.0, min(1.0, score))


def estimate_tokens(text: str) -> int:
    """About four characters per token for English; a target that counts more answers 400, not a failover."""
    return len(text) // 4 + 1
