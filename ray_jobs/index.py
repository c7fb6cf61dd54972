"""Ray job: chunk, embed and index the zone's validated scrubbed snapshot.

    python -m ray_jobs.index --zone us [--scrubbed-key KEY]

Refuses a snapshot that has not passed validation (the downstream block holds even when the
job is started by hand). Chunks already embedded under the same config are reused by chunk id.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from keel.failures import DataQualityError
from keel.pipeline import index
from keel.pipeline.snapshots import SnapshotStore, manifest_hash, read_parts, snapshot_key, write_parts
from keel.settings import KeelSettings, get_settings, load_settings
from keel.storage import ZoneStorage
from ray_jobs import validate
from ray_jobs._job import Timer, audited, emit, free_resources, init_ray, manifest_ref, parse_args


def run(zone: str, scrubbed_key: str | None = None, config: str | None = None) -> dict[str, Any]:
    settings = load_settings(config) if config else get_settings()
    version = settings.config_version()
    storage = ZoneStorage.for_zone(settings, zone)
    scrubbed_store = SnapshotStore(storage, "scrubbed", keep=settings.pipeline.keep_snapshots)
    store = SnapshotStore(storage, "index", keep=settings.pipeline.keep_snapshots)
    with audited(settings, "index", zone) as audit:
        scrubbed = scrubbed_store.resolve(scrubbed_key)
        audit.input = manifest_ref(scrubbed)
        if not validate.passed(storage, scrubbed, version):
            raise DataQualityError(f"zone {zone}: scrubbed snapshot {scrubbed['key']} has not passed validation: blocked")
        key = snapshot_key("index", manifest_hash(scrubbed), version)
        summary: dict[str, Any] = {"stage": "index", "zone": zone, "key": key, "input": {"scrubbed": scrubbed["key"]}}
        if (done := store.committed(key)) is not None:
            audit.output, audit.counts, audit.skipped = done, done["counts"], True
            return {**summary, "skipped": "already committed", "counts": done["counts"], "manifest": done}

        timer = Timer()
        with timer.stage("plan"):
            docs = read_parts(scrubbed_store, scrubbed, "documents")
            known = _previous_vectors(store, version)
        with timer.stage("chunk_embed"):
            chunks = _chunk_embed(settings, docs, frozenset(known["chunk_id"].to_pylist()))
        with timer.stage("write"):
            chunks = _fill_known(chunks, known)
            staging = store.begin(key)
            write_parts(staging, "chunks", chunks, sort_by="chunk_id")
            index.write_table(storage.uri(staging.path, "lance"), chunks.sort_by("chunk_id"), storage)
            reused = int(pc.sum(pc.is_in(chunks["chunk_id"], value_set=known["chunk_id"].combine_chunks())).as_py() or 0)
            counts = {"documents": docs.num_rows, "chunks": chunks.num_rows, "embedded": chunks.num_rows - reused,
                      "reused": reused}
            manifest = store.commit(staging, {"inputs": {"scrubbed": scrubbed["key"]}, "config_version": version,
                                              "counts": counts})
        audit.output, audit.counts = manifest, counts
    return {**summary, "counts": counts, "manifest": manifest, "durations": timer.durations}


def _previous_vectors(store: SnapshotStore, version: str) -> pa.Table:
    prev = store.current()
    if prev is None or prev.get("config_version") != version:
        return index.CHUNKS_SCHEMA.empty_table().select(["chunk_id", "vector"])
    return read_parts(store, prev, "chunks", ["chunk_id", "vector"])


def _chunk_embed(settings: KeelSettings, docs: pa.Table, known: frozenset[str]) -> pa.Table:
    import ray
    import ray.data

    if not docs.num_rows:
        return index.CHUNKS_SCHEMA.empty_table()
    device, actors, batch, per_actor = placement(settings, free_resources())
    if device == "cpu" and settings.pipeline.embedding_runtime == "onnx":
        from keel.pipeline.embedding import ensure_exported

        ensure_exported(index.model_cache(settings))
    step = max(16, -(-docs.num_rows // (4 * actors)))
    ds = ray.data.from_arrow([docs.slice(i, step) for i in range(0, docs.num_rows, step)]).map_batches(
        index.ChunkEmbedder,
        fn_constructor_args=(settings, known, device, batch),
        batch_size=batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        **per_actor,
    )
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables([t.cast(index.CHUNKS_SCHEMA) for t in tables]) if tables else index.CHUNKS_SCHEMA.empty_table()


# A GPU wants bigger batches than a CPU core: fp16 MiniLM on an H200 embeds 17.9k chunks/s at
# 64 per call, 36.6k at 256 and 40.2k at 1024 (benchmarks/results/embed_gpu.json).
GPU_BATCH_FACTOR = 8


def placement(settings: KeelSettings, resources: dict[str, float]) -> tuple[str, int, int, dict[str, float]]:
    """Where the embedding actors run: (device, how many, batch size, Ray resources of each)."""
    p = settings.pipeline
    gpus = int(resources.get("GPU", 0))
    if p.embedding_device == "cuda" and not gpus:
        raise ValueError("pipeline.embedding_device is cuda but the Ray cluster has no GPU")
    if p.embedding_device != "cpu" and gpus:
        return "cuda", min(p.embed_actors, gpus), p.embed_batch_size * GPU_BATCH_FACTOR, {"num_cpus": 1, "num_gpus": 1}
    return "cpu", min(p.embed_actors, max(1, int(resources.get("CPU", 1)))), p.embed_batch_size, {"num_cpus": 1}


def _fill_known(chunks: pa.Table, known: pa.Table) -> pa.Table:
    if not known.num_rows:
        return chunks
    vectors = dict(zip(known["chunk_id"].to_pylist(), known["vector"].to_pylist(), strict=True))
    filled = [v if v is not None else vectors[c] for c, v in zip(chunks["chunk_id"].to_pylist(),
                                                                   chunks["vector"].to_pylist(), strict=True)]
    return chunks.set_column(chunks.schema.get_field_index("vector"), "vector",
                             pa.array(filled, index.CHUNKS_SCHEMA.field("vector").type))


def main() -> None:
    args = parse_args(__doc__, lambda p: p.add_argument("--scrubbed-key", default=None))
    init_ray()
    emit(run(args.zone, args.scrubbed_key, args.config))


if __name__ == "__main__":
    main()
