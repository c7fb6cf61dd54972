"""The vector index: a LanceDB table of scrubbed chunks and their MiniLM vectors, per zone.

LanceDB is embedded (no server: right for a laptop), stores its tables as Lance files on a local
disk or S3 (so the index lives in the zone's own storage, like every other batch output), reads
and writes Arrow (what Ray Data and Parquet already hold), and answers vector search with
optional filters. The batch job writes a fresh table into each committed index snapshot; the
gateway and `keel search` open the zone's current one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from keel.pipeline.embedding import DIM
from keel.pipeline.snapshots import SnapshotStore
from keel.storage import ZoneStorage

if TYPE_CHECKING:
    from lancedb.table import Table

log = logging.getLogger(__name__)

TABLE = "chunks"
CHUNKS_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("doc_id", pa.string()),
        ("seq", pa.int32()),
        ("source", pa.string()),
        ("source_name", pa.string()),  # the configured source: who may read it is decided at query time
        ("title", pa.string()),
        ("data_class", pa.string()),
        ("text", pa.string()),
        ("vector", pa.list_(pa.float32(), DIM)),
    ]
)


def storage_options(storage: ZoneStorage) -> dict[str, str]:
    opts = {}
    if storage.s3_endpoint:
        opts["aws_endpoint"] = storage.s3_endpoint
    if storage.region:
        opts["aws_region"] = storage.region
    return opts if not storage.is_local else {}


def write_table(uri: str, chunks: pa.Table, storage: ZoneStorage) -> None:
    import lancedb

    db = lancedb.connect(uri, storage_options=storage_options(storage) or None)
    db.create_table(TABLE, data=chunks.cast(CHUNKS_SCHEMA), mode="overwrite")


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    source: str
    title: str | None
    text: str
    distance: float
    zone: str
    data_class: str

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _in(column: str, values: Sequence[str]) -> str:
    """`column IN ('a', 'b')`, each value an SQL string literal (quotes doubled)."""
    return f"{column} IN (" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


def _filter(classes: Sequence[str] | None, sources: Sequence[str] | None) -> str | None:
    """The prefilter for chunks of `classes` from `sources` (None: any); "" when nothing may match."""
    if (classes is not None and not classes) or (sources is not None and not sources):
        return ""
    parts = [_in(c, v) for c, v in (("data_class", classes), ("source_name", sources)) if v is not None]
    return " AND ".join(parts) or None


def _open(storage: ZoneStorage, sources: Sequence[str] | None) -> Table | None:
    """The zone's current index table; None when there is none yet, or when `sources` filters it and it
    was written before chunks named their source (fail closed: the next pipeline run rebuilds it)."""
    import lancedb

    store = SnapshotStore(storage, "index")
    current = store.current()
    if current is None:
        return None
    db = lancedb.connect(store.uri(current["key"]) + "/lance", storage_options=storage_options(storage) or None)
    table = db.open_table(TABLE)
    if sources is not None and "source_name" not in table.schema.names:
        log.warning("zone %s: index %s predates source_name; nothing is read for a tenant until it is rebuilt",
                    storage.zone, current["key"])
        return None
    return table


def search(storage: ZoneStorage, query_vector: np.ndarray, k: int = 5,
           classes: Sequence[str] | None = None, sources: Sequence[str] | None = None) -> list[Hit]:
    """Top-k chunks of the zone's current index (empty when the zone has none yet), of `classes` and from
    the sources named in `sources` only when given: filtered before the nearest-neighbour search, so k of
    them come back when k exist."""
    from lancedb.query import LanceVectorQueryBuilder

    where = _filter(classes, sources)
    if where == "" or (table := _open(storage, sources)) is None:
        return []
    # A vector for a query gives a vector query builder; the table's search() is typed as their base.
    search: LanceVectorQueryBuilder = table.search(query_vector.astype(np.float32))  # type: ignore[assignment]
    query = search.distance_type("cosine").limit(k)
    if where is not None:
        query = query.where(where, prefilter=True)
    return [
        Hit(r["chunk_id"], r["doc_id"], r["source"], r["title"], r["text"], float(r["_distance"]), storage.zone,
            r["data_class"])
        for r in query.to_list()
    ]


_CHUNK_ID = re.compile(r"^[A-Za-z0-9_:.-]{1,128}$")


def lookup(storage: ZoneStorage, chunk_ids: Sequence[str],
           sources: Sequence[str] | None = None) -> dict[str, tuple[str, str]]:
    """chunk_id -> (data_class, text) for the ids found in the zone's current index, from the sources named
    in `sources` only when given. Ids come from answers (untrusted): one that is not a well-formed id is
    simply not found, nor is one of a source not named."""
    ids = sorted({i for i in chunk_ids if _CHUNK_ID.match(i)})
    of_sources = _filter(None, sources)
    if not ids or of_sources == "" or (table := _open(storage, sources)) is None:
        return {}
    where = " AND ".join(w for w in (_in("chunk_id", ids), of_sources) if w)
    rows = table.search().where(where).select(["chunk_id", "data_class", "text"]).limit(len(ids))
    return {r["chunk_id"]: (r["data_class"], r["text"]) for r in rows.to_list()}


class ChunkEmbedder:
    """Ray Data batch function: scrubbed documents -> chunk rows with vectors (model loaded once per actor).

    Chunks whose id is in `known` (embedded by an earlier run under the same config) get no
    vector here; the job fills them from the previous snapshot instead of paying for them again.
    """

    def __init__(
        self, settings: Any, known: frozenset[str] = frozenset(), device: str = "cpu", batch_size: int | None = None
    ) -> None:
        from keel.pipeline.embedding import Embedder

        self.p = settings.pipeline
        self.known = known
        self.batch_size = batch_size or self.p.embed_batch_size
        self.embedder = Embedder(self.p.embedding_runtime, model_cache(settings), device=device)  # type: ignore[arg-type]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from keel.pipeline.chunking import chunk_text

        rows = []
        for d in batch.to_pylist():
            for c in chunk_text(d["doc_id"], d["text"], self.p.chunk_tokens, self.p.chunk_overlap_tokens):
                rows.append({"chunk_id": c.chunk_id, "doc_id": d["doc_id"], "seq": c.seq, "source": d["source"],
                             "source_name": d["source_name"], "title": d["title"], "data_class": d["data_class"],
                             "text": c.text, "vector": None})
        todo = [i for i, r in enumerate(rows) if r["chunk_id"] not in self.known]
        vectors = self.embedder.encode([rows[i]["text"] for i in todo], self.batch_size)
        for i, v in zip(todo, vectors, strict=True):
            rows[i]["vector"] = v.tolist()
        return pa.Table.from_pylist(rows, schema=CHUNKS_SCHEMA)


def model_cache(settings: Any) -> Path:
    """Where derived model files (the exported ONNX graph) are cached: <state_dir>/models."""
    return Path(settings.state) / "models"
