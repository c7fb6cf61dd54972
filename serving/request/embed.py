"""The embeddings endpoint's own stage: its request checked and embedded in this replica (MiniLM, the
vector index's model). The text goes to no model target, so it is not pseudonymized (that would
change the vectors); the call is authenticated and recorded like any other."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from keel.errors import InvalidParameterError, ModelNotFoundError
from keel.routing import estimate_tokens
from serving import api
from serving.request.context import RequestContext

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class Embed:
    name = "embed"

    def __init__(self, embed: Callable[[list[str]], np.ndarray]) -> None:
        self.embed = embed  # keel.retrieval.Retriever.embed

    async def __call__(self, ctx: RequestContext) -> None:
        req = api.parse(await ctx.http.body(), api.EmbeddingRequest)
        ctx.model = req.model
        if req.model not in (EMBEDDING_MODEL, "keel/embed"):
            raise ModelNotFoundError(f"embedding model {req.model!r} does not exist; use {EMBEDDING_MODEL!r}",
                                     param="model")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if any(not isinstance(t, str) or not t for t in texts):
            raise InvalidParameterError("input must be a non-empty string or a list of them", param="input")
        vectors = await asyncio.to_thread(self.embed, texts)
        ctx.model, ctx.body = EMBEDDING_MODEL, {"input": texts}
        tokens = sum(estimate_tokens(t) for t in texts)
        ctx.result = api.embeddings(EMBEDDING_MODEL, vectors, req.encoding_format, tokens)
