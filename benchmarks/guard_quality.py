"""What the PII guard costs in answer quality, and what it keeps private, on the golden sets.

SmolLM2-135M on llama.cpp (the embedded target, rendered exactly as the gateway's replica renders it)
answers each item under four guards:
  off         the request as sent (quality's ceiling; no privacy)
  all         every entity type pseudonymized (the guard's default before this benchmark)
  kept        the chosen default: public and internal requests keep places (LOCATION) as sent
  kept+note   kept, and the system message telling the model what placeholders are
              (guard.placeholder_note: PLACEHOLDER_NOTE; off by default, see GuardSettings)
on three sets:
  rag         golden rag questions (class internal) with the pages they were written from as context
              (the retrieval a gateway does is left out: this measures the guard, not the index);
              token F1 against the reference answer
  world       short questions about places (the issue's "capital of France"); the expected word in
              the answer
  privacy     golden privacy items (their own class, pii or phi): PII values that reach the model
              (must be 0 under any guard), the caller's values back in the answer after restore
              (recall), and answers with a placeholder the restore could not put back (invented,
              cut or rewritten by the model: "broken")
Answers are greedy (temperature 0), so one prompt is generated once and shared by the guards that
send it unchanged.

Usage: python benchmarks/guard_quality.py [--rag 30] [--max-tokens 96]
Prints a table and writes benchmarks/results/guard_quality.json.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "guard_quality.json"
GOLDEN = ROOT / "data" / "golden"
SAMPLE = ROOT / "data" / "sample"
GUARDS = ("off", "all", "kept", "kept+note")
CONTEXT_CHARS = 1500  # per source page, about what two retrieved chunks hold
WORLD = [  # (question, a word the answer must hold)
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"), ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"), ("What is the capital of Egypt?", "Cairo"),
    ("In which country is Paris?", "France"), ("In which country is Tokyo?", "Japan"),
    ("In which country is Berlin?", "Germany"), ("In which country is Madrid?", "Spain"),
    ("Which ocean lies between Europe and North America?", "Atlantic"),
    ("What language is spoken in Brazil?", "Portuguese"), ("What language is spoken in Mexico?", "Spanish"),
    ("What is the currency of Japan?", "yen"),
]
# A Keel placeholder the restore left in the answer: one the model invented (<PERSON_3>), cut (<PERSON_1),
# or rewritten ([PERSON_1], PERSON_1). A template word of the model's own (<NAME>) is not one.
BROKEN = re.compile(r"<?\b[A-Z][A-Z_]*_\d+\b>?")


def rag_items(n: int) -> list[dict[str, Any]]:
    from keel.feedback.prompts import RAG_PROMPT

    items = []
    for line in (GOLDEN / "rag.jsonl").read_text().splitlines()[:n]:
        it = json.loads(line)
        pages = [(SAMPLE / s).read_text()[:CONTEXT_CHARS] for s in it["sources"] if (SAMPLE / s).exists()]
        context = RAG_PROMPT + "\n\n".join(f"[{i}] {p}" for i, p in enumerate(pages, 1))
        items.append({"set": "rag", "id": it["id"], "class": it.get("data_class") or "internal",
                      "messages": [{"role": "system", "content": context},
                                   {"role": "user", "content": it["question"]}], "reference": it["reference"]})
    return items


def world_items() -> list[dict[str, Any]]:
    return [{"set": "world", "id": f"world-{i:02d}", "class": "internal", "expected": word,
             "messages": [{"role": "user", "content": q}]} for i, (q, word) in enumerate(WORLD, 1)]


def privacy_items() -> list[dict[str, Any]]:
    items = []
    for line in (GOLDEN / "privacy.jsonl").read_text().splitlines():
        it = json.loads(line)
        items.append({"set": "privacy", "id": it["id"], "class": it.get("data_class") or "pii", "pii": it["pii"],
                      "messages": [{"role": "user", "content": it["question"]}]})
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rag", type=int, default=30, help="rag items (the first N of the golden set)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--n-threads", type=int, default=2)
    a = ap.parse_args(argv)
    logging.disable(logging.WARNING)

    from keel.evaluation.scorers import token_f1
    from keel.guard import Actions, AnswerGuard, Guard
    from keel.policy import DataClass
    from keel.privacy import without_torch
    from keel.settings import PLACEHOLDER_NOTE, load_settings
    from serving.targets.llama_cpp import LlamaCppReplica, model_path

    settings = load_settings()
    policy = settings.policy
    with without_torch():
        guard = Guard(settings.guard, settings.privacy)
    quiet = copy.copy(guard)  # the same engine and memo, with and without the placeholder note
    quiet.settings = settings.guard.model_copy(update={"placeholder_note": ""})
    guard.settings = settings.guard.model_copy(update={"placeholder_note": PLACEHOLDER_NOTE})
    replica = LlamaCppReplica(model_path({}), 4096, a.n_threads, 1.1)
    answers: dict[str, tuple[str, float]] = {}  # rendered request -> (answer, seconds): greedy, so shared

    async def generate(messages: list[dict[str, Any]]) -> str:
        key = json.dumps(messages, sort_keys=True)
        if key not in answers:
            t0 = time.perf_counter()
            body = {"messages": messages, "max_tokens": a.max_tokens, "temperature": 0.0, "seed": 7}
            text = "".join([p.get("text", "") async for p in replica.stream("chat", body)])
            answers[key] = (text, time.perf_counter() - t0)
        return answers[key][0]

    async def ask(item: dict[str, Any], how: str) -> dict[str, Any]:
        body = {"messages": item["messages"]}
        dc = DataClass(item["class"])
        if how == "off":
            sent, restore = body, None
        else:
            keep = frozenset() if how == "all" else policy.kept_entities(dc)
            protected = (guard if how == "kept+note" else quiet).protect(body, keep=keep)
            sent = protected.body
            restore = AnswerGuard(guard, protected, Actions())
        raw = await generate(sent["messages"])
        answer = await restore.feed(raw, final=True) if restore else raw
        prompt = json.dumps(sent)
        out: dict[str, Any] = {"answer": answer}
        if item["set"] == "rag":
            out["f1"] = token_f1(answer, item["reference"])
        elif item["set"] == "world":
            out["correct"] = float(item["expected"].lower() in answer.lower())
        else:
            out["leaked"] = sum(v in prompt for v in item["pii"])
            out["recall"] = sum(v in answer for v in item["pii"]) / len(item["pii"])
            out["broken"] = float(bool(BROKEN.search(answer)))
        return out

    async def run() -> dict[str, Any]:
        items = rag_items(a.rag) + world_items() + privacy_items()
        rows: dict[str, dict[str, list[float]]] = {}
        per_item = []
        t0 = time.perf_counter()
        for n, item in enumerate(items, 1):
            got = {how: await ask(item, how) for how in GUARDS}
            per_item.append({"id": item["id"], "class": item["class"],
                             **{how: {k: v for k, v in r.items() if k != "answer"} | {"answer": r["answer"][:300]}
                                for how, r in got.items()}})
            for how, r in got.items():
                for metric, v in r.items():
                    if metric != "answer":
                        rows.setdefault(f"{item['set']} {metric}", {}).setdefault(how, []).append(float(v))
            print(f"  {n}/{len(items)} {item['id']} ({time.perf_counter() - t0:.0f} s, "
                  f"{len(answers)} answers generated)", file=sys.stderr)
        return {"rows": rows, "items": per_item}

    res = asyncio.run(run())
    table = {name: {how: round(statistics.mean(v), 3) for how, v in by.items()} for name, by in res["rows"].items()}
    print(f"\n{'metric (mean)':<20}" + "".join(f"{g:>12}" for g in GUARDS))
    for name, by in table.items():
        print(f"{name:<20}" + "".join(f"{by[g]:>12.3f}" for g in GUARDS))
    gen_s = [s for _, s in answers.values()]
    write_report({
        "benchmark": "guard_quality", "model": "SmolLM2-135M-Instruct Q4 (llama.cpp, greedy)",
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "max_tokens": a.max_tokens, "rag_items": a.rag, "note": PLACEHOLDER_NOTE, "guards": list(GUARDS),
        "kept_entities": {dc.value: sorted(policy.kept_entities(dc)) for dc in DataClass},
        "means": table, "answers_generated": len(answers), "generation_s_median": round(statistics.median(gen_s), 2),
        "items": res["items"],
    }, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
