"""Retrieval across zones: the nearest chunks to a query in the vector indexes of the zones named.

Each zone's index is searched where it lives (data never moves across zones to be searched), with
the data classes allowed only and, for a tenant, the sources it may read only (a source's `tenants`;
a chunk of a source no longer configured is read by no tenant), and the hits are merged by distance.
The gateway's RAG and `keel search` both ask this one place.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from keel.pipeline.embedding import Embedder
    from keel.pipeline.index import Hit
    from keel.settings import KeelSettings


class Retriever:
    """One per process: the embedding model is loaded on first use, once."""

    def __init__(self, settings: KeelSettings) -> None:
        self.settings = settings
        self._embedder: Embedder | None = None
        self._loading = threading.Lock()  # callers embed from worker threads

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length vectors, one row per text (the index's model)."""
        if self._embedder is None:
            with self._loading:
                if self._embedder is None:
                    from keel.pipeline.embedding import Embedder
                    from keel.pipeline.index import model_cache

                    self._embedder = Embedder(self.settings.pipeline.embedding_runtime, model_cache(self.settings))
        return self._embedder.encode(texts)

    def sources(self, tenant: str | None) -> list[str] | None:
        """Names of the sources `tenant` may read (None: no tenant, every chunk: an operator's query; none
        for a name that is no configured tenant). Read from the settings on each query, so a change of a
        source's readers needs no re-index."""
        if tenant is None:
            return None
        if tenant not in {t.name for t in self.settings.policy.tenants}:
            return []
        return self.settings.pipeline.readable_by(tenant)

    def search(self, query: str, zones: Iterable[str], k: int, classes: Sequence[str] | None = None,
               tenant: str | None = None) -> list[Hit]:
        """The `k` nearest chunks to `query` over every zone's current index, of `classes` only when given,
        and of the sources `tenant` may read only when given."""
        from keel.pipeline import index
        from keel.storage import ZoneStorage

        sources = self.sources(tenant)
        if sources == [] or classes == []:
            return []
        vector = self.embed([query])[0]
        found = [h for z in zones
                 for h in index.search(ZoneStorage.for_zone(self.settings, z), vector, k, classes, sources)]
        return sorted(found, key=lambda h: h.distance)[:k]

    def chunks(self, chunk_ids: Sequence[str], zones: Iterable[str],
               tenant: str | None = None) -> dict[str, tuple[str, str]]:
        """chunk_id -> (data_class, text) of the ids found in the named zones' current indexes, of the
        sources `tenant` may read only when given."""
        from keel.pipeline import index
        from keel.storage import ZoneStorage

        sources = self.sources(tenant)
        found: dict[str, tuple[str, str]] = {}
        for z in zones:
            found |= index.lookup(ZoneStorage.for_zone(self.settings, z), chunk_ids, sources)
        return found
