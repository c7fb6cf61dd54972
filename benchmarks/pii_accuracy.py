"""PII detection accuracy and speed: Keel's engine vs Presidio's default recognizers.

Corpora come from presidio-evaluator's PresidioSentenceFaker (templates + fake people), made
offline from two seeds: TUNE_SEED, which Keel's recognizers may be tuned on, and HOLDOUT_SEED,
fixed before any tuning and never tuned on. Both are measured in the same run.

Definitions (a scrubber cares about leaks more than labels):
* a labelled value is covered when predicted spans of any type cover >= 50% of its characters;
  recall(type) = covered / total; leak rate = 1 - covered / total over TARGET_TYPES;
* a prediction is correct when >= 50% of its characters fall inside some labelled span (of any
  type); precision(type) = correct / predicted, and overall precision counts every prediction.
Speed: docs/s of detect over the corpus, one document per call and batched (nlp.pipe).

Usage: python benchmarks/pii_accuracy.py [--samples 3000] [--seeds tune,holdout] [--engines keel,presidio]
Prints a table and writes benchmarks/results/pii_accuracy.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

TUNE_SEED = 42
HOLDOUT_SEED = 20261125  # committed before any tuning; never tune on it
SEEDS = {"tune": TUNE_SEED, "holdout": HOLDOUT_SEED}
TARGET_TYPES = (
    "PERSON",
    "STREET_ADDRESS",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "CREDIT_CARD",
    "US_SSN",
    "IBAN_CODE",
    "IP_ADDRESS",
)
GOALS = {"leak_rate_max": 0.05, "precision_min": 0.85}
RESULTS = Path(__file__).resolve().parent / "results" / "pii_accuracy.json"


def make_corpus(seed: int, samples: int) -> list[dict]:
    """Labelled sentences: [{"text", "labels": [(type, start, end)]}]."""
    from presidio_evaluator.data_generator import PresidioSentenceFaker

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        faker = PresidioSentenceFaker("en_US", lower_case_ratio=0.05, random_seed=seed)
        sentences = faker.generate_new_fake_sentences(num_samples=samples)
    return [
        {"text": s.full_text, "labels": [(sp.entity_type, sp.start_position, sp.end_position) for sp in s.spans]}
        for s in sentences
    ]


def covered_fraction(start: int, end: int, spans: list[tuple[int, int]]) -> float:
    if end <= start:
        return 0.0
    hit = sum(max(0, min(end, e) - max(start, s)) for s, e in spans)
    return hit / (end - start)


def score(corpus: list[dict], predictions: list[list]) -> dict:
    total: dict[str, int] = defaultdict(int)
    covered: dict[str, int] = defaultdict(int)
    predicted: dict[str, int] = defaultdict(int)
    correct: dict[str, int] = defaultdict(int)
    for doc, preds in zip(corpus, predictions, strict=True):
        pred_spans = [(p.start, p.end) for p in preds]  # non-overlapping (engine resolves overlaps)
        label_spans = [(s, e) for _, s, e in doc["labels"]]
        for typ, s, e in doc["labels"]:
            total[typ] += 1
            if covered_fraction(s, e, pred_spans) >= 0.5:
                covered[typ] += 1
        for p in preds:
            predicted[p.type] += 1
            # labels can overlap each other; a character counts once
            chars = {c for s, e in label_spans for c in range(max(s, p.start), min(e, p.end))}
            if len(chars) / max(1, p.end - p.start) >= 0.5:
                correct[p.type] += 1
    per_type = {}
    for typ in TARGET_TYPES:
        per_type[typ] = {
            "labelled": total[typ],
            "recall": covered[typ] / total[typ] if total[typ] else None,
            "predicted": predicted[typ],
            "precision": correct[typ] / predicted[typ] if predicted[typ] else None,
        }
    n_total = sum(total[t] for t in TARGET_TYPES)
    n_cov = sum(covered[t] for t in TARGET_TYPES)
    n_pred = sum(predicted.values())
    return {
        "per_type": per_type,
        "leak_rate": 1 - n_cov / n_total if n_total else 0.0,
        "recall": n_cov / n_total if n_total else 0.0,
        "precision": sum(correct.values()) / n_pred if n_pred else 0.0,
        "predictions_by_type": dict(sorted(predicted.items())),
        "leaked_examples": [],
    }


def leaked_examples(corpus: list[dict], predictions: list[list], limit: int = 40) -> list[dict]:
    out = []
    for doc, preds in zip(corpus, predictions, strict=True):
        pred_spans = [(p.start, p.end) for p in preds]
        for typ, s, e in doc["labels"]:
            if typ in TARGET_TYPES and covered_fraction(s, e, pred_spans) < 0.5:
                out.append({"type": typ, "value": doc["text"][s:e], "text": doc["text"][:300]})
                if len(out) >= limit:
                    return out
    return out


def false_positives(corpus: list[dict], predictions: list[list], limit: int = 40) -> list[dict]:
    out = []
    for doc, preds in zip(corpus, predictions, strict=True):
        label_spans = [(s, e) for _, s, e in doc["labels"]]
        for p in preds:
            if covered_fraction(p.start, p.end, label_spans) < 0.5:
                out.append({"type": p.type, "value": doc["text"][p.start : p.end], "text": doc["text"][:300]})
                if len(out) >= limit:
                    return out
    return out


def measure(engine, corpus: list[dict], single_limit: int) -> tuple[list[list], float, float]:
    texts = [d["text"] for d in corpus]
    engine.detect_batch(texts[:32])  # warm up
    t0 = time.perf_counter()
    predictions = engine.detect_batch(texts)
    batched = len(texts) / (time.perf_counter() - t0)
    subset = texts[:single_limit]
    t0 = time.perf_counter()
    for t in subset:
        engine.detect(t)
    single = len(subset) / (time.perf_counter() - t0)
    return predictions, single, batched


def fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{x:6.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--seeds", default="tune,holdout")
    ap.add_argument("--engines", default="keel,presidio")
    ap.add_argument("--single-limit", type=int, default=1000, help="documents timed one call at a time")
    ap.add_argument("--examples", action="store_true", help="print leaked values and false positives")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)

    from keel.privacy.engine import PrivacyEngine
    from keel.settings import get_settings

    engines = {name: PrivacyEngine(get_settings().privacy, profile=name) for name in args.engines.split(",")}
    report: dict = {
        "samples": args.samples,
        "seeds": {k: SEEDS[k] for k in args.seeds.split(",")},
        "target_types": TARGET_TYPES,
        "goals": GOALS,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "results": {},
    }
    for seed_name in args.seeds.split(","):
        corpus = make_corpus(SEEDS[seed_name], args.samples)
        for name, engine in engines.items():
            preds, single, batched = measure(engine, corpus, args.single_limit)
            result = score(corpus, preds)
            result["docs_per_s"] = {"single": round(single, 1), "batched": round(batched, 1)}
            result["leaked_examples"] = leaked_examples(corpus, preds)
            result["false_positive_examples"] = false_positives(corpus, preds)
            report["results"][f"{seed_name}/{name}"] = result

    print_table(report)
    if args.examples:
        for key, r in report["results"].items():
            print(f"\n## {key}: leaked")
            for ex in r["leaked_examples"]:
                print(f"  {ex['type']:15} {ex['value']!r}")
            print(f"## {key}: false positives")
            for ex in r["false_positive_examples"]:
                print(f"  {ex['type']:15} {ex['value']!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def print_table(report: dict) -> None:
    keys = list(report["results"])
    print(f"\nPII accuracy on PresidioSentenceFaker corpora ({report['samples']} sentences per seed)")
    print("recall / precision per entity type; columns: " + ", ".join(keys))
    header = f"{'entity':16}" + "".join(f" | {k:>22}" for k in keys)
    print(header)
    print("-" * len(header))
    for typ in TARGET_TYPES:
        row = f"{typ:16}"
        for k in keys:
            t = report["results"][k]["per_type"][typ]
            row += f" | {fmt(t['recall'])} / {fmt(t['precision'])} n={t['labelled']:<4}"
        print(row)
    print("-" * len(header))
    for label, fn in (
        ("leak rate", lambda r: fmt(r["leak_rate"])),
        ("recall", lambda r: fmt(r["recall"])),
        ("precision (all)", lambda r: fmt(r["precision"])),
        ("docs/s single", lambda r: f"{r['docs_per_s']['single']:6.1f}"),
        ("docs/s batched", lambda r: f"{r['docs_per_s']['batched']:6.1f}"),
    ):
        print(f"{label:16}" + "".join(f" | {fn(report['results'][k]):>22}" for k in keys))
    print(f"goals: leak rate <= {GOALS['leak_rate_max']}, precision >= {GOALS['precision_min']}")


if __name__ == "__main__":
    raise SystemExit(main())
