"""The embeddings endpoint's own stages. Its request is parsed first (ParseEmbedding), so that it takes
scope (the data class and zones it may use), admission (the tenant's rate limit) and the record like
any other request; then it is embedded in this replica (Embed: MiniLM, the vector index's model). The
text goes to no model target and is not stored, so it is not pseudonymized (that would change the
vectors); the audit record goes to the request's zone, as a refused request's does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from keel.errors import InvalidParameterError, ModelNotFoundError
from keel.routing import estimate_tokens
from serving import api
from serving.request.context import RequestContext

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class ParseEmbedding:
    name = "parse"

    async def __call__(self, ctx: RequestContext) -> None:
        req = api.parse(await ctx.http.body(), api.EmbeddingRequest)
        ctx.model = req.model
        if req.model not in (EMBEDDING_MODEL, "keel/embed"):
            raise ModelNotFoundError(f"embedding model {req.model!r} does not exist; use {EMBEDDING_MODEL!r}",
                                     param="model")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if any(not isinstance(t, str) or not t for t in texts):
            raise InvalidParameterError("input must be a non-empty string or a list of them", param="input")
        ctx.model, ctx.body = EMBEDDING_MODEL, {"input": texts, "encoding_format": req.encoding_format}
        ctx.prompt_text, ctx.max_tokens = "\n".join(texts), 0  # admission charges the input alone


class Embed:
    name = "embed"

    def __init__(self, embed: Callable[[list[str]], np.ndarray]) -> None:
        self.embed = embed  # keel.retrieval.Retriever.embed

    async def __call__(self, ctx: RequestContext) -> None:
        texts = list((ctx.body or {})["input"])
        vectors = await asyncio.to_thread(self.embed, texts)
        tokens = sum(estimate_tokens(t) for t in texts)
        ctx.result = api.embeddings(EMBEDDING_MODEL, vectors, (ctx.body or {})["encoding_format"], tokens)
