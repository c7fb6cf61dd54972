"""RAG: a chat request for keel/rag (or with `rag: true`) grounded in the vector indexes of the zones
its data may go to (`rag_zone` alone when it is one of them), with chunks of the classes it may carry
and of the sources its tenant may read only: retrieval never moves data across zones or tenants. The
chunks go in a system message, cited as [n]; where each chunk's text lies in it is kept (`ctx.passages`),
so the guard reads each passage on its own and a passage retrieved again is not analysed again (keel.guard)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from keel.feedback.prompts import RAG_PROMPT
from keel.messages import text_of
from keel.policy import Policy
from serving.api import ChatRequest
from serving.request.context import RequestContext, required

if TYPE_CHECKING:
    from keel.pipeline.index import Hit



class Search(Protocol):
    def __call__(self, query: str, zones: Sequence[str], k: int, classes: Sequence[str] | None = None,
                 tenant: str | None = None) -> list[Hit]:
        ...  # keel.retrieval.Retriever.search


class Ground:
    name = "ground"

    def __init__(self, search: Search, policy: Policy, top_k: int, rag_zone: str | None) -> None:
        self.search, self.policy, self.top_k, self.rag_zone = search, policy, top_k, rag_zone

    async def __call__(self, ctx: RequestContext) -> None:
        req = required(ctx.request)
        if not (isinstance(req, ChatRequest) and (req.model == "keel/rag" or req.rag)):
            return
        tenant = required(ctx.tenant)
        classes = self.policy.readable_classes(tenant, required(ctx.data_class), ctx.zones)
        zones = [self.rag_zone] if self.rag_zone in ctx.zones else ctx.zones
        hits = await asyncio.to_thread(self.search, ctx.ask, zones, self.top_k, [c.value for c in classes],
                                       tenant.name)
        instructions = ctx.variant.text if ctx.variant is not None else RAG_PROMPT  # the prompt stage's choice
        content, passages = instructions, []
        for i, h in enumerate(hits, 1):
            content += ("\n\n" if i > 1 else "") + f"[{i}] "
            passages.append((len(content), len(content) + len(h.text)))
            content += h.text
        system = {"role": "system", "content": content if hits else instructions + "(the index is empty)"}
        body = required(ctx.body)
        ctx.body = {**body, "messages": [system, *body["messages"]]}
        ctx.passages = {0: passages}
        ctx.prompt_text = "\n".join(text_of(m.get("content")) for m in ctx.body["messages"])
        ctx.citations = [{"n": i, "chunk_id": h.chunk_id, "doc_id": h.doc_id, "source": h.source, "title": h.title,
                          "zone": h.zone, "data_class": h.data_class, "distance": round(h.distance, 4)}
                         for i, h in enumerate(hits, 1)]
