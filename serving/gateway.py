"""The gateway: a Ray Serve ingress speaking the OpenAI API in front of every model target.

Per request: authenticate the key, admit or refuse at once (429), validate the body, pick a ranked
list of targets (keel.routing, pure policy), then stream through `failover.run`. External targets
are called straight from here (one hop); in-cluster ones (llama.cpp, vLLM) through a handle.
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
from keel.keys import KeyRing
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
        self.states = {
            t.name: TargetState(make_target(t, handles.get(t.name), g), CircuitBreaker(g.breaker_failures, g.breaker_cooldown_s),
                                LatencyStats(g.ewma_alpha), g.max_in_flight_per_target)
            for t in settings.policy.targets
        }
        self.limits = Limits(g.request_timeout_s, g.first_token_timeout_s, g.stall_timeout_s)
        self.weights = Weights(g.weights.latency, g.weights.cost, g.weights.complexity)
        self.in_flight = 0
        self.metrics = Metrics(self.states)
        self.trails = Trails(settings, f"gateway-{api.replica_name()}")
        self.default_zone = next(iter(settings.policy.zones))
        self._embedder: Any = None

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
        try:
            self._auth(request)
            req = api.parse(await request.body(), api.EmbeddingRequest)
            if req.model not in (EMBEDDING_MODEL, "keel/embed"):
                raise APIError(404, f"embedding model {req.model!r} does not exist; use {EMBEDDING_MODEL!r}",
                               code="model_not_found", param="model")
            texts = [req.input] if isinstance(req.input, str) else req.input
            if any(not isinstance(t, str) or not t for t in texts):
                raise APIError(400, "input must be a non-empty string or a list of them", param="input")
            vectors = await asyncio.to_thread(self._embed, texts)
        except APIError as e:
            self.metrics.request("embeddings", e.status)
            return e.response()
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        tokens = sum(estimate_tokens(t) for t in texts)
        self.metrics.request("embeddings", 200)
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
            tenant = self._auth(request)
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
        tenant = model = route = body = None
        try:
            tenant = self._auth(request)
            if self.in_flight >= self.g.max_in_flight_per_replica:
                raise APIError(429, "the gateway is at capacity; retry shortly", code="overloaded",
                               retry_after=self.g.retry_after_s)
            req = api.parse(await request.body(), api.ChatRequest if kind == "chat" else api.CompletionRequest)
            model = req.model
            body, prompt_text, ask = api.target_body(kind, req)
            citations = None
            if kind == "chat" and (req.model == "keel/rag" or req.rag):
                body, citations = await self._ground(body, ask)
                prompt_text = "\n".join(api.text_of(m.get("content")) for m in body["messages"])
            route = self._route(req, kind, prompt_text, ask)
        except APIError as e:
            self.metrics.request(endpoint, e.status)
            if tenant is not None:
                self._audit(api.audit_fields(rid, tenant, endpoint, model, e.status, route, None, body,
                                             time.monotonic() - started))
            return e.response(headers)
        self.in_flight += 1
        outcome = Outcome()

        def finish(status: int) -> None:
            seconds = time.monotonic() - started
            self.metrics.finish(endpoint, status, outcome, seconds)
            self._audit(api.audit_fields(rid, tenant, endpoint, model, status, route, outcome, body, seconds))

        stream = failover.run(self.states, route.ranked, kind, body, self.limits, outcome)
        try:
            first = await anext(stream)  # a failure before the first token is still a proper HTTP error
        except (NoTargetLeft, TargetError) as e:
            self.in_flight -= 1
            await stream.aclose()
            err = self._failure(e)
            finish(err.status)
            return err.response(headers | {"x-keel-route": api.route_header(outcome.target, route)})
        except BaseException:
            self.in_flight -= 1
            await stream.aclose()
            raise
        headers["x-keel-route"] = api.route_header(outcome.target, route)
        meta = {"id": rid, "created": int(time.time()), "model": req.model}
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
                self._sse(kind, meta, first, stream, outcome, route, citations, release),
                media_type="text/event-stream", headers=headers | {"cache-control": "no-cache"},
                background=BackgroundTask(release),
            )
        chunks = [first]
        try:
            chunks += [c async for c in stream]
        except (NoTargetLeft, TargetError) as e:
            err = self._failure(e)
            finish(err.status)
            return err.response(headers)
        finally:
            self.in_flight -= 1
        finish(200)
        headers["x-keel-route"] = api.route_header(outcome.target, route)
        return JSONResponse(api.gathered(kind, meta, chunks, outcome) | {"keel": api.keel_field(rid, route, outcome, citations)},
                            headers=headers)

    def _audit(self, fields: dict[str, Any]) -> None:
        """One record per interaction, in the zone where its data went (the answering target's), else
        the first zone. A failed write is logged and counted, never dropped silently."""
        target = fields.get("target")
        zone = self.states[target].target.config.zone if target in self.states else self.default_zone
        try:
            self.trails.append(zone, "interaction", **fields)
        except Exception:  # noqa: BLE001 - the answer is already decided; the failure must be visible
            self.metrics.audit_failed()
            logger.exception("audit record for request %s could not be written", fields.get("request_id"))

    async def _sse(self, kind: Kind, meta: dict[str, Any], first: Chunk, stream: AsyncIterator[Chunk],
                   outcome: Outcome, route: Route, citations: list[dict[str, Any]] | None,
                   release: Callable[[int], Awaitable[None]]) -> AsyncIterator[str]:
        status = 499  # until the stream ends: a caller gone mid-stream
        try:
            yield api.sse_chunk(kind, meta, first, role=True)
            async for chunk in stream:
                if chunk.text or chunk.tool_calls or chunk.finish_reason:
                    yield api.sse_chunk(kind, meta, chunk)
            status = 200
        except (NoTargetLeft, TargetError) as e:
            err = self._failure(e)
            status = err.status
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            await release(status)
        # The route can change after the headers went out (a mid-stream failover): the final event holds it.
        final = {**meta, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "choices": [],
                 "usage": outcome.usage, "keel": api.keel_field(meta["id"], route, outcome, citations)}
        yield f"event: keel.route\ndata: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"

    def _route(self, req: Any, kind: Kind, prompt_text: str, ask: str) -> Route:
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
        max_tokens = (getattr(req, "max_completion_tokens", None) or req.max_tokens or DEFAULT_MAX_TOKENS)
        complexity = complexity_score(ask) if uses_complexity(strategy, pinned, self.weights) else 0.0
        rr = RouteRequest(estimate_tokens(prompt_text), max_tokens, frozenset(needs), None, complexity)
        cands = [Candidate(s.target.config, s.breaker.available, s.stats) for s in names.values()]
        route = plan(cands, rr, strategy, pinned=pinned, weights=self.weights,
                     complexity_threshold=self.g.complexity_threshold)
        if route.ranked:
            return route
        reasons = route.excluded.values()
        if any(r.startswith("health") for r in reasons):
            raise APIError(503, "no healthy model target can serve this request now", code="no_healthy_target",
                           retry_after=self._retry_after())
        if cap := [r for r in reasons if r.startswith("capability")]:
            param = "tools" if "tools" in cap[0] else "response_format"
            raise APIError(400, f"no model target for {req.model!r} supports {param}", code="unsupported_parameter",
                           param=param)
        if any(r.startswith("context") for r in reasons):
            raise APIError(400, f"the prompt ({rr.prompt_tokens} tokens, estimated) plus max_tokens ({max_tokens}) "
                                f"exceeds every eligible target's context window", code="context_length_exceeded",
                           param="messages" if kind == "chat" else "prompt")
        raise APIError(403, "no model target is allowed for this request's data", code="residency")

    def _failure(self, e: Exception) -> APIError:
        if isinstance(e, TargetError):  # a client error reported by the target: the request's fault
            err = (e.body or {}).get("error") or {}
            return APIError(e.status or 400, str(err.get("message") or e), code=err.get("code"), param=err.get("param"))
        assert isinstance(e, NoTargetLeft)
        if e.busy:
            return APIError(429, "every model target is at capacity; retry shortly", code="overloaded",
                            retry_after=self.g.retry_after_s)
        tried = "; ".join(f"{f['target']}: {f['error']}" for f in e.outcome.failovers)
        return APIError(503, f"no model target could answer ({tried})", code="all_targets_failed",
                        retry_after=self._retry_after())

    def _retry_after(self) -> int:
        waits = [s.breaker.probe_in() for s in self.states.values() if s.breaker.state == "open"]
        return max(self.g.retry_after_s, math.ceil(min(waits))) if waits else self.g.retry_after_s

    def _auth(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (keel keys create)",
                           code="missing_api_key")
        tenant = self.keys.tenant(header[7:].strip())
        if tenant is None:
            raise APIError(401, "invalid or revoked API key", code="invalid_api_key")
        return tenant

    # -- embeddings and retrieval ----------------------------------------------------------------

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            from keel.pipeline.embedding import Embedder
            from keel.pipeline.index import model_cache

            self._embedder = Embedder(self.settings.pipeline.embedding_runtime, model_cache(self.settings))
        return self._embedder.encode(texts)

    async def _ground(self, body: dict[str, Any], ask: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from keel.pipeline import index
        from keel.storage import ZoneStorage

        zone = self.g.rag_zone or next(iter(self.settings.policy.zones))
        storage = ZoneStorage.for_zone(self.settings, zone)
        vector = (await asyncio.to_thread(self._embed, [ask]))[0]
        hits = await asyncio.to_thread(index.search, storage, vector, self.g.rag_top_k)
        context = "\n\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, 1))
        system = {"role": "system", "content": RAG_PROMPT + (context or "(the index is empty)")}
        citations = [{"n": i, "chunk_id": h.chunk_id, "doc_id": h.doc_id, "source": h.source, "title": h.title,
                      "zone": h.zone, "distance": round(h.distance, 4)} for i, h in enumerate(hits, 1)]
        return {**body, "messages": [system, *body["messages"]]}, citations
