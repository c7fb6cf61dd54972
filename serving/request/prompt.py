"""The system prompt of keel/rag and of the aliases: a variant from the MLflow Prompt Registry, chosen
by Thompson sampling on the feedback each variant got (keel.feedback.variants: refreshed off the
request path, the same for every replica). A RAG request's variant is its grounding instructions,
which ground writes with the passages; an alias's goes first, before the caller's own messages.
A model without registered variants gets none: its requests go as sent."""

from __future__ import annotations

from typing import Protocol

from keel.feedback.prompts import Variant, prompt_name
from serving.api import ChatRequest
from serving.request.context import RequestContext, required


class Choose(Protocol):
    def choose(self, prompt: str) -> Variant | None: ...  # keel.feedback.variants.VariantBoard


class Prompt:
    name = "prompt"

    def __init__(self, variants: Choose) -> None:
        self.variants = variants

    async def __call__(self, ctx: RequestContext) -> None:
        req = required(ctx.request)
        if not isinstance(req, ChatRequest):
            return
        model = "keel/rag" if req.rag else req.model
        if (name := prompt_name(model)) is None or (variant := self.variants.choose(name)) is None:
            return
        ctx.variant = variant
        if model != "keel/rag":
            body = required(ctx.body)
            ctx.body = {**body, "messages": [{"role": "system", "content": variant.text}, *body["messages"]]}
            ctx.prompt_text = f"{variant.text}\n{ctx.prompt_text}"
