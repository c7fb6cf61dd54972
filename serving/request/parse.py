"""The body as a chat or text-completion request (a 400 in OpenAI's shape when it is not one), and
what the later stages read of it: the body as targets get it, its text, the ask, the answer's length."""

from __future__ import annotations

from keel.routing import DEFAULT_MAX_TOKENS
from serving import api
from serving.request.context import RequestContext


class Parse:
    name = "parse"

    async def __call__(self, ctx: RequestContext) -> None:
        raw = await ctx.http.body()
        req = api.parse(raw, api.ChatRequest) if ctx.kind == "chat" else api.parse(raw, api.CompletionRequest)
        ctx.request, ctx.model = req, req.model
        ctx.body, ctx.prompt_text, ctx.ask = api.target_body(ctx.kind, req)
        asked = req.max_completion_tokens if isinstance(req, api.ChatRequest) else None
        ctx.max_tokens = asked or req.max_tokens or DEFAULT_MAX_TOKENS
