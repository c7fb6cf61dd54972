"""The gateway: a Ray Serve ingress speaking the OpenAI API in front of every model target.

Per request: authenticate the key (its tenant), admit or refuse at once (429), validate the body,
settle the data class and the zones it may go to (403), apply the tenant's rate limit (429), pick a
ranked list of targets in those zones only (keel.routing, pure policy), pseudonymize what they will
see (keel.guard), then stream through `failover.run` and hand the caller the checked, restored
answer. External targets are called straight from here (one hop); in-cluster ones (llama.cpp,
vLLM) through a handle. Every interaction ends as one audit record.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from ray import serve

from keel.audit import Trails
from keel.breaker import CircuitBreaker
from keel.guard import Actions, AnswerGuard, Guard
from keel.keys import KeyRing
from keel.policy import DataClass, Tenant, resolve_class
from keel.ratelimit import RateLimiter
from keel.routing import ALIASES, Candidate, LatencyStats, Route, RouteRequest, Weights, complexity_score, estimate_tokens, plan, uses_complexity
from keel.settings import KeelSettings
from serving import api, failover
from serving.api import APIError
from serving.failover import Limits, NoTargetLeft, Outcome, TargetState
from serving.metrics import Metrics
from serving.targets import make_target
from serving.targets.base import Chunk, Kind, TargetError

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MAX_TOKENS = 512  # what routing assumes for the answer when a request sets no max_tokens
RAG_PROMPT = ("Answer the user's question from the context below. Cite the passages you use as [1], [2]. "
              "If the context does not hold the answer, say so.\n\n")

logger = logging.getLogger("keel.gateway")
app = FastAPI(title="Keel gateway", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    def __init__(self, settings: KeelSettings, handles: dict[str, Any]) -> None:
        g = settings.gateway
        self.settings, self.g = settings, g
        self.keys = KeyRing(settings)
        self.policy = settings.policy
        self.tenants = {t.name: t for t in settings.policy.tenants}
        self.limiter = RateLimiter(share=1 / g.replicas)
        self.states = {
            t.name: TargetState(make_target(t, handles.get(t.name), g), CircuitBreaker(g.breaker_failures, g.breaker_cooldown_s),
                                LatencyStats(g.ewma_alpha), g.max_in_flight_per_target)
            for t in settings.policy.targets
        }
        self.limits = Limits(g.request_timeout_s, g.first_token_timeout_s, g.stall_timeout_s)
        self.weights = Weights(g.weights.latency, g.weights.cost, g.weights.complexity)
        self.in_flight = 0
        self.metrics = Metrics(self.states)
        # Records are written by the trail's own thread, never on this event loop; a failed write is counted.
        self.trails = Trails(settings, f"gateway-{api.replica_name()}", on_error=lambda e, rid: self.metrics.audit_failed())
        self._embedder: Any = None
        self.guard = None
        if settings.guard.enabled:
            from keel.privacy import without_torch

            with without_torch():  # a replica is a process of its own: 300 MB less without torch
                self.guard = Guard(settings.guard, settings.privacy)
        for zone in settings.policy.zones:  # the configuration this replica decides under, in every zone
            self.trails.submit(zone, "config", **api.config_fields(settings))

    def __del__(self) -> None:
        self.trails.close()  # Serve calls it when the replica stops: the open segment gets sealed

    # -- endpoints -----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        """Embeddings run in this replica (MiniLM): the text goes to no model target, so it is not
        pseudonymized (that would change the vectors); the call is audited like any other."""
        rid, started = api.request_id(), time.monotonic()
        tenant: Tenant | None = None
        model = texts = None
        try:
            tenant = self._auth(request)
            req = api.parse(await request.body(), api.EmbeddingRequest)
            model = req.model
            if req.model not in (EMBEDDING_MODEL, "keel/embed"):
                raise APIError(404, f"embedding model {req.model!r} does not exist; use {EMBEDDING_MODEL!r}",
                               code="model_not_found", param="model")
            texts = [req.input] if isinstance(req.input, str) else req.input
            if any(not isinstance(t, str) or not t for t in texts):
                raise APIError(400, "input must be a non-empty string or a list of them", param="input")
            vectors = await asyncio.to_thread(self._embed, texts)
        except APIError as e:
            self.metrics.request("embeddings", e.status)
            if tenant is not None:
                self._finish_audit(rid, tenant, "embeddings", model, e.status, None, None, None, started, None, [],
                                   Actions(), 0)
            return e.response()
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        tokens = sum(estimate_tokens(t) for t in texts)
        self.metrics.request("embeddings", 200)
        self._finish_audit(rid, tenant, "embeddings", EMBEDDING_MODEL, 200, None, None, {"input": texts}, started, None,
                           [], Actions(), 0)
        return JSONResponse({"object": "list", "data": data, "model": EMBEDDING_MODEL,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except APIError as e:
            return e.response()
        ids = [*ALIASES, *self.states, EMBEDDING_MODEL]
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "keel"}
                                                        for i in ids]})

    @app.get("/v1/audit/{request_id}")
    async def audit_records(self, request_id: str, request: Request) -> Response:
        """The caller's own audit records of one request. Another tenant's request is a 404, like a
        request that never was, so ids do not leak."""
        try:
            tenant = self._auth(request).name
            found = [r for r in await asyncio.to_thread(self.trails.find, request_id) if r.get("tenant") == tenant]
            if not found:
                raise APIError(404, f"no audit record for request {request_id!r}", code="not_found")
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": found})

    @app.get("/healthz")
    async def healthz(self) -> Response:
        targets = {n: {"breaker": s.breaker.status, "in_flight": s.in_flight, "served": s.served, "failed": s.failed,
                       "ewma_ms": round(s.stats.expected_s * 1000, 1)} for n, s in self.states.items()}
        ok = any(s.breaker.available for s in self.states.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "in_flight": self.in_flight, "targets": targets},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        body, content_type = self.metrics.render(self.in_flight)
        return Response(body, media_type=content_type)

    # -- generation ----------------------------------------------------------------------------

    async def _generate(self, request: Request, kind: Kind) -> Response:
        rid = api.request_id()
        endpoint = "chat" if kind == "chat" else "completions"
        started = time.monotonic()
        headers: dict[str, str] = {}  # Serve sets x-request-id (the same id as rid)
        tenant: Tenant | None = None
        model = route = body = data_class = None
        zones: list[str] = []
        charged = 0
        actions = Actions()
        try:
            tenant = self._auth(request)
            if self.in_flight >= self.g.max_in_flight_per_replica:
                raise APIError(429, "the gateway is at capacity; retry shortly", code="overloaded",
                               retry_after=self.g.retry_after_s)
            req = api.parse(await request.body(), api.ChatRequest if kind == "chat" else api.CompletionRequest)
            model = req.model
            data_class, zones = self._scope(request, tenant)
            body, prompt_text, ask = api.target_body(kind, req)
            max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or DEFAULT_MAX_TOKENS
            charged = estimate_tokens(prompt_text) + max_tokens
            self._rate_limit(tenant, charged)
            citations = None
            if kind == "chat" and (req.model == "keel/rag" or req.rag):
                classes = self.policy.readable_classes(tenant, data_class, zones)
                body, citations = await self._ground(body, ask, zones, classes)
                prompt_text = "\n".join(api.text_of(m.get("content")) for m in body["messages"])
            route = self._route(req, kind, prompt_text, ask, max_tokens, zones)
            answer = None
            if self.guard is not None:
                kinds = [self.states[n].target.config.kind for n in route.ranked]
                if self.policy.pseudonymizes(data_class, kinds):
                    try:
                        protected = await asyncio.to_thread(self.guard.protect, body)
                    except Exception:  # noqa: BLE001 - fail closed: nothing unprotected goes out
                        logger.exception("the PII guard failed on request %s", rid)
                        raise APIError(500, "the PII guard could not process this request; it was not sent to any "
                                            "model", code="guard_failed") from None
                    actions.pseudonymized, actions.entities = True, protected.entities
                else:
                    protected = self.guard.unprotected(body)
                body = protected.body
                answer = AnswerGuard(self.guard, protected, actions)
        except APIError as e:
            self.metrics.request(endpoint, e.status)
            if tenant is not None:
                if e.code == "rate_limit_exceeded":
                    charged = 0  # refused before it was charged
                self._finish_audit(rid, tenant, endpoint, model, e.status, route, None, body, started, data_class,
                                   zones, actions, charged)
            return e.response(headers)
        self.in_flight += 1
        outcome = Outcome()

        def finish(status: int) -> None:
            self.metrics.finish(endpoint, status, outcome, time.monotonic() - started)
            self._finish_audit(rid, tenant, endpoint, model, status, route, outcome, body, started, data_class, zones,
                               actions, charged)

        stream = failover.run(self.states, route.ranked, kind, body, self.limits, outcome)
        try:
            first = await anext(stream)  # a failure before the first token is still a proper HTTP error
        except (NoTargetLeft, TargetError) as e:
            self.in_flight -= 1
            await stream.aclose()
            err = self._failure(e, zones)
            finish(err.status)
            return err.response(headers | {"x-keel-route": api.route_header(outcome.target, route)})
        except BaseException:
            self.in_flight -= 1
            await stream.aclose()
            raise
        headers["x-keel-route"] = api.route_header(outcome.target, route)
        meta = {"id": rid, "created": int(time.time()), "model": req.model}

        def keel_info() -> dict[str, Any]:
            """The response's `keel` field, taken when the answer is done (a failover may change the route)."""
            return (api.keel_field(rid, route, outcome, citations)
                    | {"data_class": data_class.value, "zones": zones, "guard": actions.record()})

        answered = answer.stream(first, stream) if answer else failover.prepend(first, stream)
        if req.stream:
            done = False

            async def release(status: int = 499) -> None:
                """Once per request: from the stream's end, or (a client gone before it began) Starlette's background."""
                nonlocal done
                if not done:
                    done = True
                    self.in_flight -= 1
                    await stream.aclose()  # type: ignore[attr-defined]
                    finish(status)

            return StreamingResponse(
                self._sse(kind, meta, answered, outcome, keel_info, zones, release),
                media_type="text/event-stream", headers=headers | {"cache-control": "no-cache"},
                background=BackgroundTask(release),
            )
        try:
            chunks = [c async for c in answered]
        except (NoTargetLeft, TargetError) as e:
            err = self._failure(e, zones)
            finish(err.status)
            return err.response(headers)
        finally:
            self.in_flight -= 1
        if answer is not None and answer.blocked:
            outcome.finish_reason = "content_filter"
        finish(200)
        headers["x-keel-route"] = api.route_header(outcome.target, route)
        return JSONResponse(api.gathered(kind, meta, chunks, outcome) | {"keel": keel_info()}, headers=headers)

    def _finish_audit(self, rid: str, tenant: Tenant, endpoint: str, model: str | None, status: int,
                      route: Route | None, outcome: Outcome | None, body: dict[str, Any] | None, started: float,
                      data_class: DataClass | None, zones: list[str], actions: Actions, charged: int) -> None:
        """Settle the tenant's token charge and write the interaction's audit record: in the zone where its
        data went (the answering target's), else the request's first allowed zone, else the first zone. A
        failed write is logged and counted, never dropped silently."""
        if charged:
            used = outcome.usage.get("total_tokens", 0) if outcome is not None and outcome.usage else 0
            self.limiter.settle(tenant.name, charged, used)
        fields = api.audit_fields(rid, tenant.name, endpoint, model, status, route, outcome, body,
                                  time.monotonic() - started)
        target = fields.get("target")
        zone = (self.states[target].target.config.zone if target in self.states
                else zones[0] if zones else next(iter(self.policy.zones)))
        fields |= {"data_class": data_class.value if data_class else None, "zone": zone, "guard": actions.record()}
        try:
            self.trails.submit(zone, "interaction", **fields)
        except Exception:  # noqa: BLE001 - a backlog: the answer is already decided; the failure must be visible
            self.metrics.audit_failed()
            logger.exception("audit record for request %s could not be written", rid)

    async def _sse(self, kind: Kind, meta: dict[str, Any], stream: AsyncIterator[Chunk], outcome: Outcome,
                   keel_info: Callable[[], dict[str, Any]], zones: list[str],
                   release: Callable[[int], Awaitable[None]]) -> AsyncIterator[str]:
        status = 499  # until the stream ends: a caller gone mid-stream
        role = True
        try:
            async for chunk in stream:
                if role or chunk.text or chunk.tool_calls or chunk.finish_reason:
                    yield api.sse_chunk(kind, meta, chunk, role=role)
                    role = False
            status = 200
        except (NoTargetLeft, TargetError) as e:
            err = self._failure(e, zones)
            status = err.status
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            await release(status)
        # The route can change after the headers went out (a mid-stream failover): the final event holds it.
        final = {**meta, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "choices": [],
                 "usage": outcome.usage, "keel": keel_info()}
        yield f"event: keel.route\ndata: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"

    def _scope(self, request: Request, tenant: Tenant) -> tuple[DataClass, list[str]]:
        """The request's data class (the key's default, or a stricter one asked in x-keel-data-class) and
        the zones its data may go to (narrowed by x-keel-zone); 400 for a bad header, 403 past the tenant's rights."""
        asked = request.headers.get("x-keel-data-class")
        try:
            requested = DataClass(asked.strip().lower()) if asked else None
        except ValueError:
            raise APIError(400, f"x-keel-data-class {asked!r} is not a data class; use one of "
                                f"{[c.value for c in DataClass]}", code="invalid_data_class",
                           param="x-keel-data-class") from None
        try:
            data_class = resolve_class(tenant, requested)
        except PermissionError as e:
            raise APIError(403, str(e), code="data_class_not_allowed", param="x-keel-data-class") from None
        try:
            zones = self.policy.request_zones(tenant, data_class, request.headers.get("x-keel-zone") or None)
        except PermissionError as e:
            raise APIError(403, str(e), code="zone_not_allowed", param="x-keel-zone") from None
        return data_class, zones

    def _rate_limit(self, tenant: Tenant, tokens: int) -> None:
        wait = self.limiter.admit(tenant.name, tenant.requests_per_minute, tenant.tokens_per_minute, tokens)
        if wait is not None:
            raise APIError(429, f"tenant {tenant.name!r} is over its rate limit ({tenant.requests_per_minute or '-'} "
                                f"requests, {tenant.tokens_per_minute or '-'} tokens per minute); retry after "
                                f"{math.ceil(wait)} s", code="rate_limit_exceeded", retry_after=max(1, math.ceil(wait)))

    def _route(self, req: Any, kind: Kind, prompt_text: str, ask: str, max_tokens: int, zones: list[str]) -> Route:
        names = self.states
        if req.model in ALIASES:
            strategy, pinned = ALIASES[req.model] or self.g.strategy, None
        elif req.model in names:
            strategy, pinned = self.g.strategy, req.model
        else:
            raise APIError(404, f"the model {req.model!r} does not exist; GET /v1/models lists them",
                           code="model_not_found", param="model")
        needs = set()
        if kind == "chat" and req.tools:
            needs.add("tools")
        if kind == "chat" and req.response_format and req.response_format.get("type") not in (None, "text"):
            needs.add("response_format")
        complexity = complexity_score(ask) if uses_complexity(strategy, pinned, self.weights) else 0.0
        rr = RouteRequest(estimate_tokens(prompt_text), max_tokens, frozenset(needs), frozenset(zones), complexity)
        cands = [Candidate(s.target.config, s.breaker.available, s.stats) for s in names.values()]
        route = plan(cands, rr, strategy, pinned=pinned, weights=self.weights,
                     complexity_threshold=self.g.complexity_threshold)
        if route.ranked:
            return route
        # Why nothing is left, most specific first: a named target's own reason, else the in-zone targets'.
        reasons = [route.excluded.get(pinned, "")] if pinned else list(route.excluded.values())
        if pinned and reasons[0].startswith("residency"):
            zone = names[pinned].target.config.zone
            raise APIError(403, f"model {pinned!r} runs in zone {zone!r}; this request's data may go only to "
                                f"{zones}", code="residency", param="model")
        in_zone = [r for r in reasons if not r.startswith("residency")]
        if not in_zone:
            raise APIError(403, f"no model target runs in the zones this request's data may go to ({zones})",
                           code="residency")
        if any(r.startswith("health") for r in in_zone):
            raise APIError(503, f"no healthy model target in zones {zones} can serve this request now; Keel never "
                                "sends it to another zone", code="no_healthy_target", retry_after=self._retry_after())
        if cap := [r for r in in_zone if r.startswith("capability")]:
            param = "tools" if "tools" in cap[0] else "response_format"
            raise APIError(400, f"no model target for {req.model!r} supports {param}", code="unsupported_parameter",
                           param=param)
        raise APIError(400, f"the prompt ({rr.prompt_tokens} tokens, estimated) plus max_tokens ({max_tokens}) "
                            f"exceeds every eligible target's context window", code="context_length_exceeded",
                       param="messages" if kind == "chat" else "prompt")

    def _failure(self, e: Exception, zones: list[str]) -> APIError:
        if isinstance(e, TargetError):  # a client error reported by the target: the request's fault
            err = (e.body or {}).get("error") or {}
            return APIError(e.status or 400, str(err.get("message") or e), code=err.get("code"), param=err.get("param"))
        assert isinstance(e, NoTargetLeft)
        if e.busy:
            return APIError(429, "every model target is at capacity; retry shortly", code="overloaded",
                            retry_after=self.g.retry_after_s)
        tried = "; ".join(f"{f['target']}: {f['error']}" for f in e.outcome.failovers)
        return APIError(503, f"no model target in zones {zones} could answer ({tried}); Keel never sends this "
                             "request to another zone", code="all_targets_failed", retry_after=self._retry_after())

    def _retry_after(self) -> int:
        waits = [s.breaker.probe_in() for s in self.states.values() if s.breaker.state == "open"]
        return max(self.g.retry_after_s, math.ceil(min(waits))) if waits else self.g.retry_after_s

    def _auth(self, request: Request) -> Tenant:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (keel keys create)",
                           code="missing_api_key")
        tenant = self.tenants.get(self.keys.tenant(header[7:].strip()) or "")
        if tenant is None:  # unknown, revoked, or of a tenant no longer in the policy
            raise APIError(401, "invalid or revoked API key", code="invalid_api_key")
        return tenant

    # -- embeddings and retrieval ----------------------------------------------------------------

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            from keel.pipeline.embedding import Embedder
            from keel.pipeline.index import model_cache

            self._embedder = Embedder(self.settings.pipeline.embedding_runtime, model_cache(self.settings))
        return self._embedder.encode(texts)

    async def _ground(self, body: dict[str, Any], ask: str, zones: list[str],
                      classes: list[DataClass]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The request grounded in the vector indexes of the zones it may go to (`rag_zone` alone when it is
        one of them), with chunks of the classes it may carry only: retrieval never moves data across zones."""
        from keel.pipeline import index
        from keel.storage import ZoneStorage

        searched = [self.g.rag_zone] if self.g.rag_zone in zones else zones
        vector = (await asyncio.to_thread(self._embed, [ask]))[0]
        wanted = [c.value for c in classes]
        found = [h for z in searched for h in await asyncio.to_thread(
            index.search, ZoneStorage.for_zone(self.settings, z), vector, self.g.rag_top_k, wanted)]
        hits = sorted(found, key=lambda h: h.distance)[: self.g.rag_top_k]
        context = "\n\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, 1))
        system = {"role": "system", "content": RAG_PROMPT + (context or "(the index is empty)")}
        citations = [{"n": i, "chunk_id": h.chunk_id, "doc_id": h.doc_id, "source": h.source, "title": h.title,
                      "zone": h.zone, "data_class": h.data_class, "distance": round(h.distance, 4)}
                     for i, h in enumerate(hits, 1)]
        return {**body, "messages": [system, *body["messages"]]}, citations
