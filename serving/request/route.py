"""The ranked targets for the request (keel.routing: the first is the choice, the rest the failover
order), in its zones only; when none is left, the error that says why, from the typed exclusions."""

from __future__ import annotations

import random
from collections.abc import Mapping

from keel.errors import (
    ContextLengthExceededError,
    KeelError,
    ModelNotFoundError,
    NoHealthyTargetError,
    ResidencyError,
    ServiceUnavailableError,
    UnsupportedParameterError,
)
from keel.evaluation.standing import Standing, StandingBoard
from keel.routing import (
    ALIASES,
    Candidate,
    Exclusion,
    Route,
    RouteRequest,
    Strategy,
    Weights,
    complexity_score,
    estimate_tokens,
    plan,
    uses_complexity,
)
from serving.api import PART_TYPES, ChatRequest, CompletionRequest
from serving.failover import TargetState, retry_after
from serving.request.context import RequestContext


class Router:
    name = "route"

    def __init__(self, states: Mapping[str, TargetState], strategy: Strategy, weights: Weights,
                 complexity_threshold: float, retry_after_s: int, board: StandingBoard | None = None) -> None:
        self.states, self.strategy, self.weights = states, strategy, weights
        self.complexity_threshold, self.retry_after_s = complexity_threshold, retry_after_s
        self.board = board  # the targets' standings from evaluation, refreshed in the background

    async def __call__(self, ctx: RequestContext) -> None:
        req = ctx.request
        if req is None:
            raise RuntimeError("route runs after parse")
        strategy, pinned = self._strategy(req.model)
        complexity = complexity_score(ctx.ask) if uses_complexity(strategy, pinned, self.weights) else 0.0
        rr = RouteRequest(estimate_tokens(ctx.prompt_text), ctx.max_tokens, _needs(req), frozenset(ctx.zones),
                          complexity, random.random())  # noqa: S311 - a canary's share, not a secret
        standings = self.board.current if self.board is not None else {}
        candidates = [Candidate(s.target.config, s.breaker.available, s.stats,
                                *_standing(standings.get(name))) for name, s in self.states.items()]
        route = plan(candidates, rr, strategy, pinned=pinned, weights=self.weights,
                     complexity_threshold=self.complexity_threshold)
        if not route.ranked:
            raise self._refusal(route, pinned, rr, ctx)
        ctx.route = route

    def _strategy(self, model: str) -> tuple[Strategy, str | None]:
        """(strategy, the target the caller named, if it named one)."""
        if model in ALIASES:
            return ALIASES[model] or self.strategy, None
        if model in self.states:
            return self.strategy, model
        raise ModelNotFoundError(f"the model {model!r} does not exist; GET /v1/models lists them", param="model")

    def _refusal(self, route: Route, pinned: str | None, rr: RouteRequest, ctx: RequestContext) -> KeelError:
        """Why nothing is left, most specific first: a named target's own reason, else the in-zone targets'."""
        zones = ctx.zones
        if pinned is None:
            reasons = list(route.excluded.items())
        else:
            reasons = [(pinned, route.excluded[pinned])] if pinned in route.excluded else []
        if pinned is not None and reasons and reasons[0][1].reason is Exclusion.RESIDENCY:
            zone = self.states[pinned].target.config.zone
            return ResidencyError(f"model {pinned!r} runs in zone {zone!r}; this request's data may go only to "
                                  f"{zones}", param="model")
        in_zone: dict[Exclusion, str] = {}  # each reason -> the first target in the zones left out for it
        for name, why in reasons:
            if why.reason is not Exclusion.RESIDENCY:
                in_zone.setdefault(why.reason, name)
        if not in_zone:
            return ResidencyError(f"no model target runs in the zones this request's data may go to ({zones})")
        if Exclusion.HEALTH in in_zone:
            return NoHealthyTargetError(f"no healthy model target in zones {zones} can serve this request now; Keel "
                                        "never sends it to another zone",
                                        retry_after=retry_after(self.states.values(), self.retry_after_s))
        if lacking := in_zone.get(Exclusion.CAPABILITY):
            missing = sorted(rr.needs - set(self.states[lacking].target.config.supports))
            param = next((p for p in ("tools", "response_format") if p in missing), "messages")
            what = ", ".join(f"{PART_TYPES[m]} content parts ({m})" if m in PART_TYPES else m for m in missing)
            return UnsupportedParameterError(f"no model target for {ctx.model!r} supports {what}", param=param)
        if Exclusion.CONTEXT in in_zone:
            return ContextLengthExceededError(
                f"the prompt ({rr.prompt_tokens} tokens, estimated) plus max_tokens ({rr.max_tokens}) exceeds every "
                "eligible target's context window", param="messages" if ctx.kind == "chat" else "prompt")
        return ServiceUnavailableError(f"no model target in zones {zones} can serve this request: "
                                       f"{'; '.join(f'{n}: {why}' for n, why in reasons)}")


def _standing(s: Standing | None) -> tuple[float, str]:
    return (1.0, "") if s is None else (s.share, s.reason)


def _needs(req: ChatRequest | CompletionRequest) -> frozenset[str]:
    """The request features a target must support to serve it."""
    if not isinstance(req, ChatRequest):
        return frozenset()
    needs = req.part_features()
    if req.tools:
        needs.add("tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        needs.add("response_format")
    return frozenset(needs)
