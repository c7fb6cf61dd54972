"""The interaction on the record, once it is over: metrics, the tenant's token charge settled with
what was used, and one audit record (the decision and its numbers, hashes of what was sent and
answered, never the text) in the zone where its data went."""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from keel.audit import Trails, canonical
from keel.ratelimit import RateLimiter
from keel.secret_keys import key_id
from keel.settings import KeelSettings
from serving.metrics import Metrics
from serving.request.context import RequestContext

logger = logging.getLogger("keel.gateway")


class Record:
    name = "record"

    def __init__(self, trails: Trails, metrics: Metrics, limiter: RateLimiter, target_zones: Mapping[str, str],
                 home_zone: str, clock: Callable[[], float] = time.monotonic, *, digest_key: bytes) -> None:
        self.trails, self.metrics, self.limiter, self.clock = trails, metrics, limiter, clock
        self.target_zones, self.home_zone = target_zones, home_zone  # home: where a record with no zone goes
        self.digest_key = digest_key  # the trail's key: a record's digests of the exchange are keyed with it

    def __call__(self, ctx: RequestContext) -> None:
        start = time.perf_counter()
        seconds = self.clock() - ctx.started
        if ctx.outcome is None:  # refused before generation began
            self.metrics.request(ctx.endpoint, ctx.status)
        else:
            self.metrics.finish(ctx.endpoint, ctx.status, ctx.outcome, seconds)
        if ctx.tenant is not None:  # an unauthenticated request has no one to charge or to show a record to
            self._settle(ctx)
            self._audit(ctx, seconds)
        ctx.timings[self.name] = time.perf_counter() - start

    def _settle(self, ctx: RequestContext) -> None:
        if ctx.charged and ctx.tenant is not None:
            usage = ctx.outcome.usage if ctx.outcome is not None else None
            self.limiter.settle(ctx.tenant.name, ctx.charged, (usage or {}).get("total_tokens", 0))

    def _audit(self, ctx: RequestContext, seconds: float) -> None:
        """In the zone where the data went (the answering target's), else the request's first allowed
        zone, else the home zone. A failed write is logged and counted, never dropped silently."""
        target = ctx.outcome.target if ctx.outcome is not None else None
        zone = self.target_zones[target] if target else ctx.zones[0] if ctx.zones else self.home_zone
        try:
            self.trails.submit(zone, "interaction", **interaction(ctx, seconds, zone, self.digest_key))
        except Exception:  # a backlog: the answer is already decided; the failure must be visible
            self.metrics.audit_failed()
            logger.exception("audit record for request %s could not be written", ctx.rid)


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
