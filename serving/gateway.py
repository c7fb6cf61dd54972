"""The gateway: a Ray Serve ingress speaking the OpenAI API in front of every model target.

A request goes through the stages of `serving.request` in order (authenticate, parse, scope, admit,
prompt, ground, route, protect, generate, check), each of which may end it with an error; the answer then
flows to the caller streamed or whole (reply), and the interaction is recorded (record). This class
builds the stages with their collaborators, once per replica, and holds the endpoints. External
targets are called straight from here (one hop); in-cluster ones (llama.cpp, vLLM) through a handle.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from keel.audit import Trails
from keel.breaker import CircuitBreaker
from keel.errors import KeelError, MethodNotAllowedError, NotFoundError, UnknownURLError
from keel.evaluation.standing import StandingBoard, source_for
from keel.feedback import prompts
from keel.feedback.store import Stores
from keel.feedback.variants import VariantBoard
from keel.guard import Guard
from keel.keys import KeyRing
from keel.ratelimit import RateLimiter
from keel.retrieval import Retriever
from keel.routing import ALIASES, LatencyStats, Weights
from keel.settings import KeelSettings
from keel.telemetry.otlp import exporter_for
from serving import api
from serving.failover import Limits, TargetState
from serving.feedback import FeedbackDesk
from serving.metrics import Metrics
from serving.request import pipeline
from serving.request.admit import Admission, Admit
from serving.request.authenticate import Authenticate
from serving.request.check import Check
from serving.request.context import Endpoint, RequestContext, request_id
from serving.request.embed import EMBEDDING_MODEL, Embed, ParseEmbedding
from serving.request.generate import Generate
from serving.request.ground import Ground
from serving.request.parse import Parse
from serving.request.prompt import Prompt
from serving.request.protect import Protect
from serving.request.record import Record, config_fields, replica_name
from serving.request.reply import Reply
from serving.request.route import Router
from serving.request.scope import Scope
from serving.request.trace import Tracer
from serving.targets import make_target
from serving.usage import UsageDesk

app = FastAPI(title="Keel gateway", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
app.openapi = lambda: api.openapi(app)  # type: ignore[method-assign]


@app.exception_handler(StarletteHTTPException)
async def _refused_by_the_router(request: Request, exc: StarletteHTTPException) -> Response:
    """What the router refuses itself (a path the API lacks, a method a path does not take), in OpenAI's
    error shape like every other refusal."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 405:
        return api.error_response(MethodNotAllowedError(f"Method not allowed ({where})"), exc.headers)
    if exc.status_code == 404:
        return api.error_response(UnknownURLError(f"Invalid URL ({where})"))
    return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                                   "code": None}}, status_code=exc.status_code, headers=exc.headers)


# Above the class: Serve serializes the class (with the module globals it uses) when it is decorated.
def _guard(settings: KeelSettings) -> Guard | None:
    if not settings.guard.enabled:
        return None
    from keel.privacy import without_torch

    with without_torch():  # a replica is a process of its own: 300 MB less without torch
        return Guard(settings.guard, settings.privacy)


def _standing_board(settings: KeelSettings) -> StandingBoard:
    """The targets' standings from their evaluations in MLflow (none configured: targets serve, canaries wait)."""
    ev = settings.evaluation
    return StandingBoard(settings.policy.targets, source_for(settings.pipeline.mlflow_tracking_uri),
                         ev.standing_refresh_s, ev.canary_share, ev.canary_step)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    def __init__(self, settings: KeelSettings, handles: dict[str, Any]) -> None:
        g, policy = settings.gateway, settings.policy
        self.clock = time.monotonic
        self.states = {
            t.name: TargetState(make_target(t, handles.get(t.name), g),
                                CircuitBreaker(g.breaker_failures, g.breaker_cooldown_s),
                                LatencyStats(g.ewma_alpha), g.max_in_flight_per_target)
            for t in policy.targets
        }
        self.admission = Admission(g.max_in_flight_per_replica, g.retry_after_s)
        self.metrics = Metrics(self.states)  # on Ray's metrics port, every replica's (serving.metrics)
        # Records are written by the trail's own thread, never on this event loop; a failed write is counted.
        self.replica = replica_name()
        self.trails = Trails(settings, f"gateway-{self.replica}", on_error=lambda e, rid: self.metrics.audit_failed())
        limiter, retriever = RateLimiter(share=1 / g.replicas), Retriever(settings)
        self.board = _standing_board(settings)
        self.metrics.start(lambda: self.admission.in_flight, self.board)
        guard, fb = _guard(settings), settings.feedback
        # Feedback links (and kept exchanges) are written by the store's own thread; the variants' posteriors
        # are read from every zone's store by the board's, so every replica samples from the same evidence.
        self.links = Stores(settings, scrub=guard.scrub if guard else None,
                            on_error=lambda e: self.metrics.feedback_link_failed())
        self.variants = VariantBoard(prompts.source_for(settings.pipeline.mlflow_tracking_uri), self.links.totals,
                                     fb.refresh_s)
        self.authenticate = Authenticate(KeyRing(settings), {t.name: t for t in policy.tenants})
        self.generate = Generate(self.states, Limits(g.request_timeout_s, g.first_token_timeout_s, g.stall_timeout_s),
                                 self.admission, g.retry_after_s)
        admit = Admit(self.admission, limiter)
        self.stages = (
            self.authenticate, Parse(), Scope(policy), admit, Prompt(self.variants),
            Ground(retriever.search, policy, g.rag_top_k, g.rag_zone),
            Router(self.states, g.strategy, Weights(g.weights.latency, g.weights.cost, g.weights.complexity),
                   g.complexity_threshold, g.retry_after_s, self.board),
            Protect(guard, policy, {n: s.target.config.kind for n, s in self.states.items()}),
            self.generate, Check(),
        )
        self.embedding_stages = (self.authenticate, ParseEmbedding(), Scope(policy), admit, Embed(retriever.embed))
        targets = {n: s.target.config for n, s in self.states.items()}
        # Traces are built and sent by the exporter's thread; what it drops or fails to send is counted.
        exporter = exporter_for(settings, "keel-gateway", on_count=lambda outcome, n: self.metrics.traces(outcome, n))
        self.tracer = Tracer(exporter, settings.telemetry.sample_rate, self.clock) if exporter else None
        self.record = Record(self.trails, self.metrics, limiter, targets, next(iter(policy.zones)), self.clock,
                             digest_key=settings.audit_keys().active, links=self.links,
                             retention_s=fb.retention_days * 86400, tracer=self.tracer)
        self.feedback = FeedbackDesk(self.authenticate, self.links, self.trails, self.metrics,
                                     guard.scrub if guard else None, fb.max_comment_chars, fb.window_days * 86400)
        self.usage = UsageDesk(self.authenticate, self.links, fb.window_days)
        self.reply = Reply(self.generate, self.record)
        for zone in policy.zones:  # the configuration this replica decides under, in every zone
            self.trails.submit(zone, "config", **config_fields(settings))

    def __del__(self) -> None:
        if (trails := getattr(self, "trails", None)) is not None:  # not when __init__ failed before it
            trails.close()  # Serve calls it when the replica stops: the open segment gets sealed
        for part in ("board", "variants", "links", "tracer", "metrics"):
            if (it := getattr(self, part, None)) is not None:
                it.close()

    # -- endpoints -----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        ctx = RequestContext(request, "embeddings", request_id(), self.clock())
        try:
            await pipeline.run(self.embedding_stages, ctx)
        except KeelError as e:
            return self.reply.refusal(ctx, e)
        ctx.status = 200
        self.record(ctx)
        return JSONResponse(ctx.result)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self.authenticate.tenant(request.headers)
        except KeelError as e:
            return api.error_response(e)
        ids = [*ALIASES, *self.states, EMBEDDING_MODEL]
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "keel"}
                                                        for i in ids]})

    @app.post("/v1/feedback")
    async def post_feedback(self, request: Request) -> Response:
        return await self.feedback(request)

    @app.get("/v1/usage")
    async def get_usage(self, request: Request) -> Response:
        return await self.usage(request)

    @app.get("/v1/audit/{request_id}")
    async def audit_records(self, request_id: str, request: Request) -> Response:
        """The caller's own audit records of one request. Another tenant's request is a 404, like a
        request that never was, so ids do not leak."""
        try:
            tenant = self.authenticate.tenant(request.headers).name
            found = [r for r in await asyncio.to_thread(self.trails.find, request_id) if r.get("tenant") == tenant]
            if not found:
                raise NotFoundError(f"no audit record for request {request_id!r}")
        except KeelError as e:
            return api.error_response(e)
        return JSONResponse({"object": "list", "data": found})

    @app.get("/healthz")
    async def healthz(self) -> Response:
        targets = {n: {"breaker": s.breaker.status, "in_flight": s.in_flight, "served": s.served, "failed": s.failed,
                       "ewma_ms": round(s.stats.expected_s * 1000, 1)} for n, s in self.states.items()}
        ok = any(s.breaker.available for s in self.states.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "replica": self.replica,
                             "in_flight": self.admission.in_flight,
                             "targets": targets, "standing": self.board.public(), "prompts": self.variants.public()},
                            status_code=200 if ok else 503)

    # -- generation ----------------------------------------------------------------------------

    async def _generate(self, request: Request, endpoint: Endpoint) -> Response:
        ctx = RequestContext(request, endpoint, request_id(), self.clock())
        try:
            await pipeline.run(self.stages, ctx)
        except KeelError as e:
            return self.reply.refusal(ctx, e)
        return await self.reply(ctx)
