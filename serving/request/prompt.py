"""The system prompt of keel/rag and of the aliases: a variant from the MLflow Prompt Registry, chosen
by Thompson sampling on the feedback each variant got (keel.feedback.variants: refreshed off the
request path, the same for every replica). A RAG request's variant is its grounding instructions,
which ground writes with the passages; an alias's goes first, before the caller's own messages.
A model without registered variants gets none: its requests go as sent. A caller may ask for one
variant by its id (x-keel-prompt: keel-rag@2), as the evaluation of each variant does."""

from __future__ import annotations

from typing import Protocol

from keel.errors import InvalidParameterError
from keel.feedback.prompts import Variant, parse_id, prompt_name
from serving.api import ChatRequest
from serving.request.context import RequestContext, required


class Choose(Protocol):  # keel.feedback.variants.VariantBoard
    def choose(self, prompt: str) -> Variant | None: ...

    def pinned(self, prompt: str, version: int) -> Variant | None: ...


class Prompt:
    name = "prompt"

    def __init__(self, variants: Choose) -> None:
        self.variants = variants

    async def __call__(self, ctx: RequestContext) -> None:
        req = required(ctx.request)
        if not isinstance(req, ChatRequest):
            return
        model = "keel/rag" if req.rag else req.model
        name = prompt_name(model)
        if (asked := ctx.http.headers.get("x-keel-prompt")) is not None:
            ctx.variant = self._pinned(asked, name, model)
        elif name is not None:
            ctx.variant = self.variants.choose(name)
        if (variant := ctx.variant) is None:
            return
        if model != "keel/rag":
            body = required(ctx.body)
            ctx.body = {**body, "messages": [{"role": "system", "content": variant.text}, *body["messages"]]}
            ctx.prompt_text = f"{variant.text}\n{ctx.prompt_text}"

    def _pinned(self, asked: str, name: str | None, model: str) -> Variant:
        wanted, version = parse_id(asked.strip())
        if wanted != name:
            raise InvalidParameterError(f"x-keel-prompt asks for a variant of {wanted}, but a request for {model} gets "
                                        f"{'prompt ' + name if name else 'no system prompt from Keel'}",
                                        param="x-keel-prompt")
        if (variant := self.variants.pinned(wanted, version)) is None:
            raise InvalidParameterError(f"{asked.strip()} is not in {wanted}'s pool (never registered, or retired: "
                                        "`keel prompts list`)", param="x-keel-prompt")
        return variant
