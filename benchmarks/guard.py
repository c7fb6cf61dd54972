"""The PII guard's cost per request, beside the model's own latency on the same prompt.

A 500-token prompt (by SmolLM2's tokenizer) dense with PII: names, emails, SSNs, card and phone
numbers, medical record numbers. Measured in one process, in the order a request meets them:
  pseudonymize   detect (Presidio + spaCy) and swap every value for a placeholder (Guard.protect)
  answer checks  the model's answer checked for new identifiers and toxicity, then restored
                 (AnswerGuard over the whole answer, as for a non-streaming request)
  restore only   the placeholders put back, streamed in 4-character pieces (no checks)
and, as the baseline, SmolLM2-135M on llama.cpp (the embedded CPU model) answering the same
pseudonymized prompt with 64 tokens: its time to first token and its whole latency.

Usage: python benchmarks/guard.py [--runs 200] [--model-runs 5]
Prints a table and writes benchmarks/results/guard.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import latency, write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "guard.json"

PARAGRAPHS = [
    "Patient Maria Gonzalez (DOB 04/12/1961, MRN 4451234) was seen on the cardiology ward. ",
    "Her husband Robert Gonzalez can be reached at (212) 555-0199 or robert.gonzalez@example.com. ",
    "Billing: card 4111 1111 1111 1111, SSN 536-22-8841, insurance member id HPN-88231-77. ",
    "She lives at 42 Elm Street, Springfield, and her GP is Dr. Alan Whitfield at the Riverside clinic. ",
    "The follow-up covered blood pressure, the change from lisinopril to losartan, and diet advice. ",
    "Please summarise the visit for the discharge letter and list the open questions for the GP. ",
]


def prompt_of(llm: Any, tokens: int) -> str:
    """The paragraphs, repeated word by word, up to `tokens` tokens of the model's tokenizer."""
    words = " ".join(PARAGRAPHS * 20).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix of whole words within the budget
        mid = (lo + hi + 1) // 2
        if len(llm.tokenize(" ".join(words[:mid]).encode(), add_bos=False)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200, help="guard runs per measure")
    ap.add_argument("--model-runs", type=int, default=5, help="model answers for the baseline")
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    logging.disable(logging.WARNING)

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from keel.guard import Actions, AnswerGuard, Guard
    from keel.privacy import StreamRestorer, without_torch
    from keel.settings import GuardSettings, PrivacySettings
    from serving.targets.llama_cpp import model_path

    llm = Llama(model_path=model_path({}), n_ctx=2048, n_threads=a.n_threads, verbose=False)
    text = prompt_of(llm, a.tokens)
    n_tokens = len(llm.tokenize(text.encode(), add_bos=False))
    t0 = time.perf_counter()
    with without_torch():  # as in a gateway replica
        guard = Guard(GuardSettings(), PrivacySettings())
    load_s = time.perf_counter() - t0

    def body() -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": text}], "max_tokens": 64}

    protected = guard.protect(body())
    sent = protected.body["messages"][0]["content"]
    # The answer a model gives to such a prompt: it repeats placeholders; its length is a summary's.
    answer = " ".join(list(protected.vault.values)[:8]) + ". " + sent[:600]

    pseudo, checks, restore = [], [], []
    for _ in range(a.runs):
        t = time.perf_counter()
        p = guard.protect(body())
        pseudo.append(time.perf_counter() - t)
        t = time.perf_counter()
        asyncio.run(AnswerGuard(guard, p, Actions()).feed(answer, final=True))
        checks.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = StreamRestorer(p.vault)
        "".join(r.feed(answer[i:i + 4]) for i in range(0, len(answer), 4)) + r.end()
        restore.append(time.perf_counter() - t)

    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos, bos)
    chat = fmt(messages=[{"role": "user", "content": sent}]).prompt
    ttft, whole = [], []
    for _ in range(a.model_runs):
        llm.reset()  # no prefix cache between runs: every answer reads the whole prompt
        t = time.perf_counter()
        first = None
        for part in llm.create_completion(chat, max_tokens=64, temperature=0, stop=[eos], stream=True):
            if first is None and part["choices"][0]["text"]:  # type: ignore[index]
                first = time.perf_counter() - t
        whole.append(time.perf_counter() - t)
        ttft.append(first or whole[-1])

    total = [p + c for p, c in zip(pseudo, checks, strict=True)]
    report = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "prompt": {"tokens": n_tokens, "chars": len(text), "placeholders": len(protected.vault),
                   "entities": protected.entities},
        "guard_load_s": round(load_s, 2),
        "pseudonymize": latency(pseudo), "answer_checks_and_restore": latency(checks), "restore_only": latency(restore),
        "guard_total": latency(total),
        "model": {"name": "SmolLM2-135M llama.cpp", "n_threads": a.n_threads, "max_tokens": 64,
                  "ttft": latency(ttft), "latency": latency(whole)},
    }
    guard_p50, model_p50 = report["guard_total"]["p50_ms"], report["model"]["latency"]["p50_ms"]
    report["ratio_guard_to_model_latency_p50"] = round(guard_p50 / model_p50, 3)
    rows = [("pseudonymize (detect + swap)", report["pseudonymize"]),
            ("answer checks + restore", report["answer_checks_and_restore"]),
            ("restore only (streamed)", report["restore_only"]),
            ("guard total per request", report["guard_total"]),
            ("model: time to first token", report["model"]["ttft"]),
            ("model: whole answer (64 tokens)", report["model"]["latency"])]
    print(f"\nPII guard on a {n_tokens}-token prompt ({len(protected.vault)} placeholders), {os.cpu_count()} CPUs")
    print(f"{'measure':<34}{'p50 ms':>10}{'p99 ms':>10}{'n':>6}")
    for name, s in rows:
        print(f"{name:<34}{s['p50_ms']:>10}{s['p99_ms']:>10}{s['n']:>6}")
    print(f"guard / model latency (p50): {report['ratio_guard_to_model_latency_p50']}")
    write_report(report, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
