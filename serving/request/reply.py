"""The response: the answer streamed (server-sent events, the general case) or whole (the same stream
gathered into one body), or a refusal in OpenAI's error shape. Either way the request is recorded
once, when its answer is over or its caller has gone."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from keel.errors import KeelError
from serving import api
from serving.failover import NoTargetLeftError
from serving.request.context import RequestContext, required
from serving.request.generate import Generate
from serving.request.record import Record
from serving.targets.base import Chunk, TargetError


class Reply:
    def __init__(self, generate: Generate, record: Record) -> None:
        self.generate, self.record = generate, record

    async def __call__(self, ctx: RequestContext) -> Response:
        req, outcome = required(ctx.request), required(ctx.outcome)
        meta = {"id": ctx.rid, "created": int(time.time()), "model": req.model}
        if req.stream:  # the headers go now: the stages so far, and the model's time to its first token
            self._stamp(ctx, outcome.ttft_s or 0.0)
            return StreamingResponse(self._events(ctx, meta), media_type="text/event-stream",
                                     headers=ctx.headers | {"cache-control": "no-cache"},
                                     background=BackgroundTask(self.finish, ctx))
        try:
            async with aclosing(self._answer(ctx)) as answer:
                chunks = [c async for c in answer]
        finally:
            await self.finish(ctx)
        self._stamp(ctx, outcome.model_s)
        if ctx.error is not None:
            return api.error_response(ctx.error, ctx.headers)
        return JSONResponse(api.gathered(ctx.kind, meta, chunks, outcome) | {"keel": self._keel(ctx)},
                            headers=ctx.headers)

    def refusal(self, ctx: RequestContext, error: KeelError) -> Response:
        """A request a stage ended: recorded, and answered with its error."""
        ctx.fail(error)
        self.record(ctx)
        self._stamp(ctx, ctx.outcome.model_s if ctx.outcome is not None else 0.0)
        ctx.finished = True
        return api.error_response(error, ctx.headers)

    async def finish(self, ctx: RequestContext) -> None:
        """Once per answer: from its end, or (a caller gone before the stream began) Starlette's background task."""
        if not ctx.finished:
            ctx.finished = True
            await self.generate.release(ctx)
            self.record(ctx)

    async def _answer(self, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        """The chunks the caller gets; a failure after the first ends the answer with `ctx.error`."""
        try:
            if ctx.first is not None:
                yield ctx.first
            async for chunk in required(ctx.rest):
                yield chunk
        except (NoTargetLeftError, TargetError) as e:
            ctx.fail(self.generate.failure(e, ctx))
            return
        ctx.status = 200

    async def _events(self, ctx: RequestContext, meta: dict[str, Any]) -> AsyncIterator[str]:
        # The route can change after the headers went out (a mid-stream failover), so the `keel` field is
        # sent once the answer is over: on the usage chunk when the caller asked for one (as OpenAI sends
        # `include_usage`), else on the chunk that finishes the answer, held back until then. A chunk
        # without choices that nobody asked for would break the `chunk.choices[0]` of many clients.
        role, last = True, None
        try:
            async with aclosing(self._answer(ctx)) as answer:
                async for chunk in answer:
                    if not (role or chunk.text or chunk.tool_calls or chunk.finish_reason):
                        continue
                    if last is not None:  # a finish_reason that was not the last chunk after all
                        yield api.sse(last)
                    body = api.chunk_body(ctx.kind, meta, chunk, role=role)
                    role = False
                    last = body if chunk.finish_reason else None
                    if last is None:
                        yield api.sse(body)
            if ctx.error is not None:
                if last is not None:
                    yield api.sse(last)
                    last = None
                yield api.error_event(ctx.error)
        finally:
            await self.finish(ctx)
        keel = {"keel": self._keel(ctx)}
        if required(ctx.request).include_usage:
            if last is not None:
                yield api.sse(last)
            yield api.sse(api.usage_chunk(ctx.kind, meta, required(ctx.outcome).usage) | keel)
        elif last is not None:
            yield api.sse(last | keel)
        yield "data: [DONE]\n\n"

    def _keel(self, ctx: RequestContext) -> dict[str, Any]:
        """The response's `keel` field, taken when the answer is done (a failover may change the route)."""
        return api.keel_field(ctx.rid, required(ctx.route), required(ctx.outcome), ctx.citations,
                              required(ctx.data_class).value, ctx.zones, ctx.actions.record(),
                              elapsed_s=self._elapsed(ctx), timings=ctx.timings,
                              prompt={"name": v.prompt, "version": v.version} if (v := ctx.variant) else None)

    def _stamp(self, ctx: RequestContext, model_s: float) -> None:
        """The route and timing headers as they stand now (a failover changes the route): the route its
        generation took, if it began, and `server-timing` with the model's `model_s` of the time so far."""
        if ctx.outcome is not None:
            ctx.headers["x-keel-route"] = api.route_header(ctx.outcome.target, required(ctx.route))
        ctx.headers["server-timing"] = api.server_timing(ctx.timings, self._elapsed(ctx), model_s)

    def _elapsed(self, ctx: RequestContext) -> float:
        return self.record.clock() - ctx.started  # on the clock ctx.started is on
