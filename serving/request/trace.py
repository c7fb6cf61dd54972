"""A request's trace: one span per stage, per target attempt (failovers included) and for the answer's
delivery, under a root span carrying the route, the prompt variant, usage and cost.

Nothing is traced while the request runs: the stages time themselves (ctx.timings) and failover keeps
each attempt's times. Once the request is recorded, `Tracer` copies a few values off the context and
hands the exporter a builder; the spans are made and sent in the exporter's thread. No text goes in
(ids, counts, timings; a guard finding is a type and a count), so a trace carries no data out of its
zone. The request id is the trace's tag `keel.request_id`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from keel.telemetry.otlp import Exporter
from keel.telemetry.spans import AttrValue, Scalar, SpanRecord, TraceRecord
from serving.request.context import RequestContext

DELIVERY = "answer"  # the span from the stages' end to the record: the answer streamed (or gathered) to the caller


@dataclass(slots=True, frozen=True)
class Snapshot:
    """What the trace is built from: taken on the event loop, cheap (references, no copies of text)."""

    rid: str
    started: float  # on the gateway's clock
    now: float  # on the gateway's clock, at the snapshot
    now_ns: int  # the wall clock at the same instant
    timings: Mapping[str, float]  # the context's own dict: record adds its time right after the snapshot
    attempts: list[tuple[str, float, float, str | None]]
    attributes: dict[str, AttrValue]
    tenant: str | None
    usage: Mapping[str, int] | None
    cost: float
    error: str | None


class Tracer:
    def __init__(self, exporter: Exporter, sample_rate: float, clock: Callable[[], float]) -> None:
        self.exporter, self.sample_rate, self.clock = exporter, sample_rate, clock

    def __call__(self, ctx: RequestContext) -> None:
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:  # noqa: S311 - sampling, not secrets
            return
        self.exporter.submit(partial(request_trace, snapshot(ctx, self.clock)))

    def close(self) -> None:
        self.exporter.close()


def snapshot(ctx: RequestContext, clock: Callable[[], float]) -> Snapshot:
    o, route, v, a = ctx.outcome, ctx.route, ctx.variant, ctx.actions
    attrs: dict[str, AttrValue] = {"keel.request_id": ctx.rid, "keel.endpoint": ctx.endpoint,
                                   "keel.status": ctx.status, "mlflow.spanType": "CHAIN"}
    if ctx.model is not None:
        attrs["keel.model"] = ctx.model
    if ctx.data_class is not None:
        attrs["keel.data_class"] = ctx.data_class.value
    if ctx.zones:
        attrs["keel.zones"] = list(ctx.zones)
    if route is not None:
        attrs |= {"keel.route.strategy": route.strategy, "keel.route.ranked": list(route.ranked)}
    if o is not None:
        attrs |= {"keel.target": o.target or "", "keel.failovers": len(o.failovers), "keel.model_ms": o.model_s * 1000}
        if o.ttft_s is not None:
            attrs["keel.ttft_ms"] = o.ttft_s * 1000
    if v is not None:
        attrs |= {"keel.prompt.name": v.prompt, "keel.prompt.version": v.version}
    if a.pseudonymized or a.entities:
        attrs |= {"keel.guard.pseudonymized": a.pseudonymized, "keel.guard.pii_entities": dict(a.entities)}
    if a.output_redacted:
        attrs["keel.guard.output_redacted"] = dict(a.output_redacted)
    if a.toxicity_action:
        attrs["keel.guard.toxicity_action"] = a.toxicity_action
    return Snapshot(ctx.rid, ctx.started, clock(), time.time_ns(), ctx.timings, o.attempts if o else [], attrs,
                    ctx.tenant.name if ctx.tenant else None, o.usage if o else None, ctx.cost,
                    ctx.error.code if ctx.error is not None else None)


def request_trace(s: Snapshot) -> TraceRecord:
    """The spans, on the wall clock: the stages ran back to back from the request's arrival."""

    def ns(t: float) -> int:  # a time on the gateway's clock, as Unix nanoseconds
        return s.now_ns - int((s.now - t) * 1e9)

    timings = dict(s.timings)
    recorded = timings.pop("record", 0.0)
    end = s.now + recorded  # the snapshot is taken in the record stage, which ends about then
    root = SpanRecord(f"keel {s.attributes['keel.endpoint']}", ns(s.started), ns(end), attributes=s.attributes,
                      error=s.error)
    if s.tenant is not None:
        root.attributes["keel.tenant"] = s.tenant
    spans, t = [root], s.started
    for name, seconds in timings.items():
        spans.append(SpanRecord(name, ns(t), ns(t + seconds), parent_id=root.span_id))
        t += seconds
    if s.attempts:
        spans.append(SpanRecord(DELIVERY, ns(t), ns(s.now), parent_id=root.span_id))
    answered = s.attempts[-1][0] if s.attempts and s.attempts[-1][3] is None else None
    for target, start, stop, error in s.attempts:
        attrs: dict[str, AttrValue] = {"keel.target": target, "mlflow.spanType": "LLM"}
        if target == answered and s.usage:
            attrs |= _usage(s.usage, s.cost)
        spans.append(SpanRecord(f"attempt {target}", ns(start), ns(stop), parent_id=root.span_id, attributes=attrs,
                                error=error))
    spans.append(SpanRecord("record", ns(s.now), ns(end), parent_id=root.span_id))
    tags = {"keel.request_id": s.rid} | ({"keel.tenant": s.tenant} if s.tenant else {})
    return TraceRecord(spans, tags)


def _usage(usage: Mapping[str, Any], cost: float) -> dict[str, AttrValue]:
    """In MLflow's own attribute names, so the trace's token usage and cost show in its UI and sums."""
    tokens: dict[str, Scalar] = {"input_tokens": int(usage.get("prompt_tokens", 0)),
                                 "output_tokens": int(usage.get("completion_tokens", 0))}
    return {"mlflow.chat.tokenUsage": tokens | {"total_tokens": sum(int(n) for n in tokens.values())},
            "mlflow.llm.cost": {"total_cost": cost}}
