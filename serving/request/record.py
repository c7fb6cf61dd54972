"""The interaction on the record, once it is over: metrics, the tenant's token charge settled with
what was used, one audit record (the decision and its numbers, hashes of what was sent and answered,
never the text) in the zone where its data went, and there too the link that lets its answer take
feedback (with the exchange itself when its tenant opted to keep it: keel.feedback.store); last, its
trace handed to the exporter (serving.request.trace)."""

from __future__ import annotations

import hmac
import logging
import os
import queue
import time
from collections.abc import Callable, Mapping
from typing import Any

from keel.audit import Trails, canonical
from keel.feedback.store import Exchange, Link, Stores
from keel.policy import ModelTarget
from keel.ratelimit import RateLimiter
from keel.secret_keys import key_id
from keel.settings import KeelSettings
from serving.metrics import Metrics
from serving.request.context import RequestContext, required
from serving.request.trace import Tracer

logger = logging.getLogger("keel.gateway")


class Record:
    name = "record"

    def __init__(self, trails: Trails, metrics: Metrics, limiter: RateLimiter, targets: Mapping[str, ModelTarget],
                 home_zone: str, clock: Callable[[], float] = time.monotonic, *, digest_key: bytes,
                 links: Stores | None = None, retention_s: float = 0.0, tracer: Tracer | None = None) -> None:
        self.trails, self.metrics, self.limiter, self.clock = trails, metrics, limiter, clock
        self.targets, self.home_zone = targets, home_zone  # home: where a record with no zone goes
        self.digest_key = digest_key  # the trail's key: a record's digests of the exchange are keyed with it
        self.links, self.retention_s = links, retention_s  # feedback links; how long a kept exchange stays
        self.tracer = tracer

    def __call__(self, ctx: RequestContext) -> None:
        start = time.perf_counter()
        seconds = self.clock() - ctx.started
        if (o := ctx.outcome) is not None and o.target is not None:
            ctx.cost = self.targets[o.target].cost(o.usage)
        self.metrics.finish(ctx.endpoint, ctx.status, seconds, ctx.outcome, ctx.cost, ctx.actions)
        if ctx.tenant is not None:  # an unauthenticated request has no one to charge or to show a record to
            self._settle(ctx)
            zone = self._zone(ctx)
            self._audit(ctx, seconds, zone)
            if ctx.outcome is not None and self.links is not None:  # generation began: an answer to rate
                self._link(ctx, zone)
        if self.tracer is not None:  # every request, refused ones too: its spans are built in the exporter's thread
            self.tracer(ctx)
        ctx.timings[self.name] = time.perf_counter() - start

    def _settle(self, ctx: RequestContext) -> None:
        if ctx.charged and ctx.tenant is not None:
            usage = ctx.outcome.usage if ctx.outcome is not None else None
            self.limiter.settle(ctx.tenant.name, ctx.charged, (usage or {}).get("total_tokens", 0))

    def _zone(self, ctx: RequestContext) -> str:
        """Where the data went (the answering target's zone), else the request's first allowed zone,
        else the home zone."""
        target = ctx.outcome.target if ctx.outcome is not None else None
        return self.targets[target].zone if target else ctx.zones[0] if ctx.zones else self.home_zone

    def _audit(self, ctx: RequestContext, seconds: float, zone: str) -> None:
        """A failed write is logged and counted, never dropped silently."""
        try:
            self.trails.submit(zone, "interaction", **interaction(ctx, seconds, zone, self.digest_key))
        except Exception:  # a backlog: the answer is already decided; the failure must be visible
            self.metrics.audit_failed()
            logger.exception("audit record for request %s could not be written", ctx.rid)

    def _link(self, ctx: RequestContext, zone: str) -> None:
        """Queued for the feedback store's writer thread; a writer far behind is logged and counted."""
        now, outcome, tenant = time.time(), required(ctx.outcome), required(ctx.tenant)
        variant, route, usage = ctx.variant, ctx.route, outcome.usage or {}
        link = Link(ctx.rid, tenant.name, ctx.endpoint, ctx.model, outcome.target, route.strategy if route else None,
                    ctx.data_class.value if ctx.data_class else None, variant.prompt if variant else None,
                    variant.version if variant else None, ctx.status, now, usage.get("prompt_tokens"),
                    usage.get("completion_tokens"), ctx.cost)
        exchange = None
        if ctx.status == 200 and outcome.kept is not None and ctx.body is not None:
            messages = ctx.body.get("messages") or [{"role": "user", "content": ctx.body.get("prompt", "")}]
            exchange = Exchange(ctx.rid, tenant.name, link.data_class or "", ctx.endpoint, messages,
                                "".join(outcome.kept), ctx.actions.pseudonymized, now, now + self.retention_s)
        try:
            required(self.links).submit(zone, link, exchange)
        except queue.Full:
            self.metrics.feedback_link_failed()
            logger.error("feedback link of request %s not written: the store's writer is behind", ctx.rid)


def interaction(ctx: RequestContext, seconds: float, zone: str, key: bytes) -> dict[str, Any]:
    """One interaction's audit record: the decision and its numbers, keyed digests of the exchange (HMAC-SHA256
    with the trail's key: of the body as the target got it, pseudonymized, where the request got that far, and
    of the answer's SHA-256), never its text. A plain hash would not do: a short value in a refused or an
    embeddings body (a name and a phone number) is found again by hashing guesses."""
    out: dict[str, Any] = {"request_id": ctx.rid, "tenant": ctx.tenant.name if ctx.tenant else None,
                           "endpoint": ctx.endpoint, "model": ctx.model, "status": ctx.status,
                           "latency_ms": round(seconds * 1000, 1)}
    if (route := ctx.route) is not None:
        out["route"] = {"strategy": route.strategy, "reason": route.reason, "ranked": list(route.ranked),
                        "excluded": route.excluded_text()}
    if ctx.body is not None:  # the key's id rides with the digests: after a rotation they still say whose they are
        out |= {"hmac_key_id": key_id(key), "prompt_hmac": hmac.new(key, canonical(ctx.body), "sha256").hexdigest()}
    if (o := ctx.outcome) is not None:
        out |= {"target": o.target, "failovers": o.failovers, "usage": o.usage,
                "ttft_ms": round(o.ttft_s * 1000, 1) if o.ttft_s is not None else None,
                "model_ms": round(o.model_s * 1000, 1),
                "response_hmac": hmac.new(key, o.answer.digest(), "sha256").hexdigest() if o.target else None}
    if ctx.variant is not None:  # the system prompt it got: feedback and evaluation credit this variant
        out["prompt"] = {"name": ctx.variant.prompt, "version": ctx.variant.version}
    if ctx.tenant is not None and ctx.tenant.purpose == "evaluation":  # apart from users' traffic; absent otherwise
        out["purpose"] = "evaluation"
    return out | {"data_class": ctx.data_class.value if ctx.data_class else None, "zone": zone,
                  "guard": ctx.actions.record()}


def config_fields(settings: KeelSettings) -> dict[str, Any]:
    """The configuration a replica decides under, for the audit trail: what routing, residency and the
    guard obey, and a hash of the whole (secrets left out), so a change of policy is on the record."""
    doc = settings.serving_config()
    return {"event": "gateway_started", "config_sha256": settings.serving_config_hash(),
            "targets": [{"name": t.name, "kind": t.kind, "zone": t.zone, "tier": t.tier}
                        for t in settings.policy.targets],
            "data_classes": doc["policy"]["data_classes"], "guard": doc["guard"],
            "strategy": doc["gateway"]["strategy"]}


def replica_name() -> str:
    """This Serve replica's unique id (one audit chain per replica), or the process id outside Serve."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a replica (unit tests)
        return f"pid{os.getpid()}"
