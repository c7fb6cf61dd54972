"""INT8 vs fp32 ONNX embeddings, side by side in one run, and the decision it drives (issue 14).

Runtimes: "onnx" (the exported fp32 graph) and "onnx-int8" (its MatMul weights dynamically quantized,
keel.pipeline.embedding.INT8_RECIPE). Everything runs in this process on one thread per embedder: no
Ray, no service (a running Keel stack is left alone).

* speed      Keel's chunk + embed stage (keel.pipeline.index.ChunkEmbedder, as batch_pipeline.py's
             "embed" row) over the seeded 1k-document corpus (scripts/make_corpus.py), scrubbed first
             by Keel's Scrubber. The runtimes alternate, --repeats times; medians of docs/s from wall
             time and from this process's CPU time (steadier on a shared machine), and int8/fp32.
* agreement  cosine of each corpus chunk's int8 vector to its fp32 vector: min, p1, median.
* variants   why the recipe: CPU time and agreement of other quantizations on a sample of chunks.
* retrieval  hit@k (k = gateway.rag_top_k) and MRR, computed by keel.evaluation.scorers' hit_at_k and
             reciprocal_rank from the top-k chunks taken as citations, with an fp32 index and an int8
             index (each index's queries embedded by its own runtime). Both indexes are searched exactly
             (numpy dot products of unit vectors), so the comparison isolates the embeddings from any
             approximate search:
             (a) rag:       the RAG golden set (data/golden/rag.jsonl) over data/sample, ingested, scrubbed
                            and chunked as the pipeline does, all zones in one index; a question sees the
                            chunks of data classes no more sensitive than its own ("internal" when it names
                            none), as the gateway filters them (tenant and zone rules left out);
             (b) generated: from the 1k corpus, every sentence of a scrubbed document (6 to 40 words, no
                            redaction token) that no other document has, even with its numbers changed, as
                            a query whose relevant document is that one (a seeded sample of --queries when
                            there are more). The corpus is templated, so few sentences qualify (174, in
                            108 of the 1k documents); the digits rule drops lines such as "Vitals: BP
                            143/64, ..." that tell notes apart by numbers alone, which no sentence embedder
                            can.
             Queries are embedded in one call per runtime: the same vectors as one at a time, as the
             gateway embeds them (fp32 does not depend on the batch; int8 runs one text per call).
             "moved" lists the queries whose first relevant chunk changed rank (None: not in the top k).
* verdict    INT8 may become the CPU default only if hit@k and MRR with the int8 index are at least 99% of
             fp32's (a drop of at most 1%, relative) on both sets. On the 78 golden items one query is 1.3%.

Usage: python benchmarks/embedding_int8.py [--docs 1000] [--repeats 3] [--queries 300] [--seed 14]
Prints a table and writes benchmarks/results/embedding_int8.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.batch_pipeline import INGEST_TIME, config_for, corpus  # noqa: E402
from benchmarks.common import write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "embedding_int8.json"
RUNTIMES = ("onnx", "onnx-int8")
MAX_DROP = 0.01  # the rule: within 1% of fp32
ALL_CLASSES = ["public", "internal", "pii", "phi"]
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_REDACTED = re.compile(r"\[[A-Z_]+(?::[0-9a-f]+)?\]")
_DIGITS = re.compile(r"\d+")


def with_runtime(settings: Any, runtime: str) -> Any:
    return settings.model_copy(update={"pipeline": settings.pipeline.model_copy(update={"embedding_runtime": runtime})})


def scrubbed_docs(cfg: Path) -> Any:
    """Every document of the config's landing sources, in all zones, as the scrub stage leaves it."""
    import pyarrow as pa

    from keel.pipeline import ingest, scrub
    from keel.settings import load_settings

    s = load_settings(cfg)
    raw = []
    for zone in s.policy.zones:
        records = [(f, r) for f in ingest.list_landing(s, zone) for r in ingest.read_file_records(f)]
        if records:
            raw.append(ingest.raw_rows(records, s, zone, {}, INGEST_TIME))
    table = pa.concat_tables(raw)
    scrubber = scrub.Scrubber(s)
    bs = s.pipeline.scrub_batch_size
    out = [scrubber(table.slice(i, bs)) for i in range(0, table.num_rows, bs)]
    docs, quarantined = scrub.split(pa.concat_tables(out))
    return docs, quarantined.num_rows


def chunk_and_embed(settings: Any, docs: Any, runtime: str) -> tuple[Any, float, float]:
    """(chunk rows with vectors, wall s, CPU s) of the chunk + embed stage over `docs`, model loaded beforehand."""
    import pyarrow as pa

    from keel.pipeline.index import ChunkEmbedder

    embedder = ChunkEmbedder(with_runtime(settings, runtime))
    embedder(docs.slice(0, 4))  # warm up, as batch_pipeline.py does
    bs = settings.pipeline.embed_batch_size
    wall, cpu = time.perf_counter(), time.process_time()
    out = [embedder(docs.slice(i, bs)) for i in range(0, docs.num_rows, bs)]
    return pa.concat_tables(out), time.perf_counter() - wall, time.process_time() - cpu


def relative_source(uri: str, root: Path) -> str:
    return uri.removeprefix("file://").removeprefix(str(root.resolve()) + "/")


def retrieval(index: Any, vectors: np.ndarray, queries: list[dict[str, Any]], query_vectors: np.ndarray,
              k: int) -> dict[str, Any]:
    """hit@k and MRR over `queries` ({"sources", "classes"}), exact search of the index's unit vectors."""
    from keel.evaluation.scorers import Item, hit_at_k, reciprocal_rank

    sources = index["source"].to_pylist()
    classes = np.asarray(index["data_class"].to_pylist())
    hits, rrs = [], []
    for q, qv in zip(queries, query_vectors, strict=True):
        sims = vectors @ qv
        sims[~np.isin(classes, q["classes"])] = -np.inf
        top = np.argsort(-sims, kind="stable")[:k]
        cited = {"status": 200, "citations": [{"n": n, "source": sources[i]} for n, i in enumerate(top, 1)]}
        item = Item({"id": q["id"]}, cited, {"sources": q["sources"]})
        hits.append(hit_at_k(item))
        rrs.append(reciprocal_rank(item))
    ranks = {q["id"]: round(1 / rr) if rr else None for q, rr in zip(queries, rrs, strict=True)}
    return {"hit_at_k": float(np.mean(hits)), "mrr": float(np.mean(rrs)), "n": len(queries), "ranks": ranks}


def golden_queries(settings: Any) -> list[dict[str, Any]]:
    from keel.evaluation.golden import load
    from keel.policy import DataClass

    items = load(ROOT / settings.evaluation.golden_dir, "rag").items
    return [{"id": it.id, "question": it.question, "sources": it.sources,
             "classes": [c.value for c in DataClass if c <= (it.data_class or DataClass.internal)]} for it in items]


def generated_queries(docs: Any, root: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """Every sentence only one document has, even with its numbers changed, as a query for that document
    (a seeded sample of `n` when there are more; see the docstring)."""
    rows = docs.select(["source", "text"]).to_pylist()
    sentences = [{" ".join(s.split()) for s in _SENTENCE.split(r["text"] or "")} for r in rows]
    seen = Counter(shape for doc in sentences for shape in {_DIGITS.sub("0", s) for s in doc})
    found = [(s, relative_source(r["source"], root))
             for r, doc in zip(rows, sentences, strict=True) for s in sorted(doc)
             if seen[_DIGITS.sub("0", s)] == 1 and 6 <= len(s.split()) <= 40 and not _REDACTED.search(s)]
    if len(found) > n:
        found = random.Random(seed).sample(found, n)  # noqa: S311 - a sample, not a secret
    return [{"id": f"gen-{i:03d}", "question": s, "sources": [src], "classes": ALL_CLASSES}
            for i, (s, src) in enumerate(found)]


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1)
    return {"min": float(cos.min()), "p1": float(np.percentile(cos, 1)), "median": float(np.median(cos)), "n": len(cos)}


def variants(cache: Path, texts: list[str], reference: np.ndarray) -> dict[str, dict[str, float]]:
    """Other dynamic quantizations of the same graph: agreement with fp32 and CPU time against fp32."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from keel.pipeline.embedding import Embedder, ensure_exported

    fp32 = ensure_exported(cache)
    recipes = {
        "s8 per-channel MatMul (Keel's)": None,
        "s8 per-tensor MatMul": {"weight_type": QuantType.QInt8, "per_channel": False},
        "u8 per-channel MatMul": {"weight_type": QuantType.QUInt8, "per_channel": True},
    }
    out = {}
    base = Embedder("onnx", cache)
    base.encode(texts[:4])
    t0 = time.process_time()
    base.encode(texts)
    fp32_cpu = time.process_time() - t0
    for name, kw in recipes.items():
        e = Embedder("onnx-int8", cache)
        if kw is not None:  # the same embedder on another graph: benchmark-only surgery
            path = cache / (re.sub(r"\W+", "-", name) + ".onnx")
            quantize_dynamic(str(fp32), str(path), op_types_to_quantize=["MatMul"], **kw)
            e._session = ort.InferenceSession(str(path), e._session.get_session_options(),
                                              providers=["CPUExecutionProvider"])
        e.encode(texts[:4])
        t0 = time.process_time()
        v = e.encode(texts)
        out[name] = {"cpu_speedup": fp32_cpu / (time.process_time() - t0), **agreement(v, reference)}
    return out


def measure_speed(settings: Any, docs: Any, repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(speed report, each runtime's chunk table with vectors): the runtimes alternate, which goes first too."""
    chunks: dict[str, Any] = {}
    wall: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    cpu: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    for rep in range(repeats):
        for rt in RUNTIMES if rep % 2 == 0 else RUNTIMES[::-1]:
            table, w, c = chunk_and_embed(settings, docs, rt)
            chunks.setdefault(rt, table)
            wall[rt].append(docs.num_rows / w)
            cpu[rt].append(docs.num_rows / c)
            print(f"  pass {rep + 1} {rt:<9} {wall[rt][-1]:6.1f} docs/s wall, {cpu[rt][-1]:6.1f} CPU", flush=True)
    speed: dict[str, Any] = {
        rt: {"docs_per_s_wall": statistics.median(wall[rt]), "docs_per_s_cpu": statistics.median(cpu[rt]),
             "wall_samples": wall[rt], "cpu_samples": cpu[rt], "chunks": chunks[rt].num_rows}
        for rt in RUNTIMES}
    for clock in ("wall", "cpu"):
        speed[f"int8_vs_fp32_{clock}"] = (speed["onnx-int8"][f"docs_per_s_{clock}"]
                                          / speed["onnx"][f"docs_per_s_{clock}"])
    return speed, chunks


def measure_retrieval(cache: Path, k: int, queries: list[dict[str, Any]],
                      indexes: dict[str, Any]) -> dict[str, Any]:
    """hit@k and MRR per runtime: its own index ({"onnx": chunk table, ...}), its own query vectors."""
    from keel.pipeline.embedding import Embedder

    row: dict[str, Any] = {"queries": len(queries), "chunks": indexes["onnx"].num_rows}
    for rt in RUNTIMES:
        vectors = np.asarray(indexes[rt]["vector"].to_pylist(), np.float32)
        query_vectors = Embedder(rt, cache).encode([q["question"] for q in queries])  # type: ignore[arg-type]
        row[rt] = retrieval(indexes[rt], vectors, queries, query_vectors, k)
    # The queries whose first relevant chunk moved (rank within k, None: not in the top k), fp32 -> int8.
    before, after = (row[rt].pop("ranks") for rt in RUNTIMES)
    row["moved"] = {q: [before[q], after[q]] for q in before if before[q] != after[q]}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of the chunk + embed stage per runtime")
    ap.add_argument("--queries", type=int, default=300, help="at most this many generated retrieval queries")
    ap.add_argument("--variant-sample", type=int, default=200, help="chunks the quantization variants embed")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    from keel.pipeline.embedding import INT8_RECIPE, ensure_exported
    from keel.pipeline.index import model_cache
    from keel.settings import load_settings
    from tests.support.services import write_config

    report: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                              "docs": args.docs, "int8_recipe": INT8_RECIPE, "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="keel-int8-") as tmp:
        work = Path(tmp)
        corpus_dir = corpus(args.docs)
        corpus_cfg = config_for(corpus_dir, work / "corpus")
        sample_cfg = write_config(work / "sample", state_dir=work / "state")  # data/sample, the same model cache
        big, sample = load_settings(corpus_cfg), load_settings(sample_cfg)
        cache = model_cache(sample)
        big = big.model_copy(update={"state_dir": sample.state_dir})
        for rt, key in (("onnx", "export_fp32_s"), ("onnx-int8", "quantize_s")):
            t0 = time.perf_counter()
            ensure_exported(cache, rt)  # type: ignore[arg-type]
            report[key] = time.perf_counter() - t0
        print(f"graphs: export {report['export_fp32_s']:.1f} s, quantize {report['quantize_s']:.1f} s", flush=True)

        t0 = time.perf_counter()
        docs, quarantined = scrubbed_docs(corpus_cfg)
        print(f"scrubbed {docs.num_rows} docs ({quarantined} quarantined) in {time.perf_counter() - t0:.0f} s")
        report["speed"], chunks = measure_speed(big, docs, args.repeats)
        vec = {rt: np.asarray(chunks[rt]["vector"].to_pylist(), np.float32) for rt in RUNTIMES}
        report["agreement"] = agreement(vec["onnx-int8"], vec["onnx"])
        step = max(1, len(vec["onnx"]) // args.variant_sample)
        texts = chunks["onnx"]["text"].to_pylist()[::step][: args.variant_sample]
        report["variants"] = variants(cache, texts, vec["onnx"][::step][: args.variant_sample])

        k = sample.gateway.rag_top_k
        sample_docs, _ = scrubbed_docs(sample_cfg)
        sample_chunks = {rt: chunk_and_embed(sample, sample_docs, rt)[0] for rt in RUNTIMES}
        report["retrieval"] = {
            "k": k,
            "rag": measure_retrieval(cache, k, golden_queries(sample), sample_chunks),
            "generated": measure_retrieval(
                cache, k, generated_queries(docs, corpus_dir, args.queries, args.seed), chunks),
        }

    rv = report["retrieval"]
    checks = {f"{name}.{m}": rv[name]["onnx-int8"][m] >= (1 - MAX_DROP) * rv[name]["onnx"][m]
              for name in ("rag", "generated") for m in ("hit_at_k", "mrr")}
    report["decision"] = {"rule": "int8 >= 0.99 x fp32 for hit@k and MRR on both sets", "checks": checks,
                          "int8_default": all(checks.values())}
    print_table(report)
    write_report(report, args.out)
    return 0


def print_table(report: dict[str, Any]) -> None:
    sp, ag, rv = report["speed"], report["agreement"], report["retrieval"]
    print(f"\nINT8 vs fp32 embeddings, {report['docs']} docs, {report['machine']['cpus']} CPUs, one thread each")
    print(f"  {'':<44} {'fp32':>9} {'int8':>9} {'int8/fp32':>10}")
    for key, label in (("docs_per_s_wall", "chunk+embed docs/s (wall, median)"),
                       ("docs_per_s_cpu", "chunk+embed docs/s (CPU time, median)")):
        a, b = sp["onnx"][key], sp["onnx-int8"][key]
        print(f"  {label:<44} {a:>9.2f} {b:>9.2f} {b / a:>10.3f}")
    for name in ("rag", "generated"):
        r = rv[name]
        for m in ("hit_at_k", "mrr"):
            a, b = r["onnx"][m], r["onnx-int8"][m]
            metric = f"hit@{rv['k']}" if m == "hit_at_k" else "MRR"
            label = f"{name} ({r['queries']} queries, {r['chunks']} chunks) {metric}"
            print(f"  {label:<44} {a:>9.4f} {b:>9.4f} {b / a if a else float('nan'):>10.4f}")
    print(f"  cosine int8 vs fp32 over {ag['n']} chunks: min {ag['min']:.4f}, p1 {ag['p1']:.4f}, "
          f"median {ag['median']:.4f}")
    for name, v in report["variants"].items():
        print(f"  variant {name:<32} CPU speedup {v['cpu_speedup']:.2f}x, cosine min {v['min']:.4f}, "
              f"median {v['median']:.4f}")
    d = report["decision"]
    print(f"  rule: {d['rule']}: " + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in d["checks"].items()))
    print(f"  verdict: {'INT8 becomes the CPU default' if d['int8_default'] else 'fp32 stays the CPU default'}")


if __name__ == "__main__":
    raise SystemExit(main())
