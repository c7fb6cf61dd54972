"""Ray job: chunk, embed and index the zone's validated scrubbed snapshot.

    python -m ray_jobs.index --zone us [--input-key SCRUBBED_KEY]

Refuses a snapshot that has not passed validation (the downstream block holds even when the
job is started by hand). Chunks already embedded under the same config are reused by chunk id.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from keel.errors import ConfigError, DataQualityError
from keel.orchestration import chain
from keel.pipeline import index
from keel.pipeline.snapshots import SnapshotStore, read_parts, write_parts
from keel.settings import KeelSettings
from ray_jobs import validate
from ray_jobs._job import free_resources, main, stage_run

STAGE = chain.stage("index")


def run(zone: str, input_key: str | None = None, config: str | None = None) -> dict[str, Any]:
    with stage_run(STAGE, zone, config) as job:
        scrubbed = job.read_input(input_key)
        if not validate.passed(job.storage, scrubbed, job.version):
            raise DataQualityError(
                f"zone {zone}: scrubbed snapshot {scrubbed['key']} has not passed validation: blocked")
        if (done := job.committed()) is not None:
            return job.skip(done, done["counts"], counts=done["counts"])

        with job.timer.stage("plan"):
            docs = read_parts(job.input_store, scrubbed, "documents")
            known = _previous_vectors(job.store, job.version)
        with job.timer.stage("chunk_embed"):
            chunks = _chunk_embed(job.settings, docs, frozenset(known["chunk_id"].to_pylist()))
        with job.timer.stage("write"):
            chunks = _fill_known(chunks, known)
            staging = job.begin()
            write_parts(staging, "chunks", chunks, sort_by="chunk_id")
            index.write_table(job.storage.uri(staging.path, "lance"), chunks.sort_by("chunk_id"), job.storage)
            was_known = pc.is_in(chunks["chunk_id"], value_set=known["chunk_id"].combine_chunks())
            reused = int(pc.sum(was_known).as_py() or 0)
            counts = {"documents": docs.num_rows, "chunks": chunks.num_rows, "embedded": chunks.num_rows - reused,
                      "reused": reused}
            manifest = job.commit(staging, {"counts": counts}, counts)
    return job.result(manifest, counts=counts)


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
    if device == "cpu" and settings.pipeline.embedding_runtime in ("onnx", "onnx-int8"):
        from keel.pipeline.embedding import ensure_exported

        ensure_exported(index.model_cache(settings), settings.pipeline.embedding_runtime)
    step = max(16, -(-docs.num_rows // (4 * actors)))
    ds = ray.data.from_arrow([docs.slice(i, step) for i in range(0, docs.num_rows, step)]).map_batches(
        index.ChunkEmbedder,
        fn_constructor_args=(settings, known, device, batch),
        batch_size=batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=per_actor["num_cpus"],
        num_gpus=per_actor.get("num_gpus"),
    )
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        return index.CHUNKS_SCHEMA.empty_table()
    return pa.concat_tables([t.cast(index.CHUNKS_SCHEMA) for t in tables])


# A GPU wants bigger batches than a CPU core: fp16 MiniLM on an H200 embeds 17.9k chunks/s at
# 64 per call, 36.6k at 256 and 40.2k at 1024 (benchmarks/results/embed_gpu.json).
GPU_BATCH_FACTOR = 8


def placement(settings: KeelSettings, resources: dict[str, float]) -> tuple[str, int, int, dict[str, float]]:
    """Where the embedding actors run: (device, how many, batch size, Ray resources of each)."""
    p = settings.pipeline
    gpus = int(resources.get("GPU", 0))
    if p.embedding_device == "cuda" and not gpus:
        raise ConfigError("pipeline.embedding_device is cuda but the Ray cluster has no GPU")
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


if __name__ == "__main__":
    main(STAGE, __doc__, run)
