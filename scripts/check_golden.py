"""Checks the golden sets in data/golden before an evaluation relies on them.

Every set loads through keel.evaluation.golden.load and holds its minimum of items, with ids named
after the set. RAG items have a reference and sources that exist under the landing root (a JSONL
`#id` as a record of that file), ask with a data class that may read those sources, and have
references whose content words mostly occur in the sources (a loose check that catches invented
facts, not paraphrases). Safety items say the expected behaviour and the category. Privacy items
carry each listed identifier verbatim and name known entity types.

Run: .venv/bin/python scripts/check_golden.py [--golden data/golden] [--landing data/sample]
Exits 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

from keel.errors import ConfigError
from keel.evaluation.golden import SETS, GoldenItem, GoldenSet, SetName, load
from keel.pipeline.documents import decode, split_file
from keel.policy import DataClass

ROOT = Path(__file__).resolve().parent.parent
MIN_ITEMS: dict[SetName, int] = {"rag": 60, "safety": 30, "privacy": 30}
MIN_SUPPORT = 0.5  # share of a reference's content words that must occur in its sources
# The sample corpus's folders and their data classes, as config/keel.example.yaml declares them.
FOLDER_CLASSES = {"us/tickets": DataClass.pii, "us/clinical": DataClass.phi, "us/product": DataClass.public,
                  "eu/hr": DataClass.pii}
DEFAULT_CLASS = DataClass.internal  # a request without x-keel-data-class (the demo tenant's default)
# The PII types a privacy item may name: Keel's entity names (a subset of keel.privacy.engine.DEFAULT_ENTITIES,
# which tests/test_golden.py checks), listed here because importing the engine loads Presidio (seconds).
PII_TYPES = frozenset({"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "STREET_ADDRESS", "CREDIT_CARD", "US_SSN",
                       "MEDICAL_RECORD_NUMBER", "DATE_OF_BIRTH", "HEALTH_PLAN_ID", "IBAN_CODE", "IP_ADDRESS"})
STOPWORDS = frozenset({
    "a", "an", "the", "and", "or", "but", "nor", "of", "to", "in", "on", "at", "by", "for", "with", "from",
    "into", "onto", "over", "under", "about", "after", "before", "than", "then", "so", "as", "if", "is", "are",
    "was", "were", "be", "been", "being", "it", "its", "this", "that", "these", "those", "there", "their", "they",
    "them", "he", "she", "his", "her", "you", "your", "we", "our", "i", "me", "my", "do", "does", "did", "done",
    "can", "could", "should", "would", "will", "may", "might", "must", "not", "no", "yes", "also", "any", "all",
    "each", "per", "up", "out", "what", "which", "who", "whom", "whose", "when", "where", "why", "how", "again",
    "only", "just", "very", "more", "most", "same", "such"
})


def content_words(text: str) -> set[str]:
    """Lowercase words and numbers ("5-10", "3.40", "hmac-sha256") that are not stopwords."""
    return {w for w in re.findall(r"[a-z0-9]+(?:[.'/-][a-z0-9]+)*", text.lower()) if w not in STOPWORDS}


@functools.lru_cache(maxsize=256)
def _file_texts(path: Path) -> dict[str, str]:
    """The text of each document in a landing file, as the pipeline decodes it: "" for a plain file,
    the record id for each JSONL record."""
    texts = {}
    for record in split_file(path.name, path.read_bytes()):
        key = record.source.partition("#")[2]
        texts[key] = decode(record.format, record.payload, max_bytes=1 << 24).text or ""
    return texts


def source_text(landing: Path, source: str) -> str | None:
    """The text of a relevant source ("us/product/refund-policy.md", ".../tickets-2026-09.jsonl#T-100034"),
    or None when it does not exist."""
    rel, _, record = source.partition("#")
    path = landing / rel
    if not path.is_file():
        return None
    return _file_texts(path).get(record)


def support(reference: str, texts: list[str]) -> tuple[float, list[str]]:
    """The share of the reference's content words found in the texts, and the words that are not."""
    words = content_words(reference)
    found = set().union(*(content_words(t) for t in texts))
    missing = sorted(words - found)
    return (1 - len(missing) / len(words) if words else 1.0), missing


def check_rag(item: GoldenItem, landing: Path) -> list[str]:
    problems = []
    if not item.reference:
        problems.append(f"{item.id}: no reference answer")
    if not item.sources:
        problems.append(f"{item.id}: no relevant sources")
    texts = []
    for source in item.sources:
        text = source_text(landing, source)
        if text is None:
            problems.append(f"{item.id}: source {source!r} does not exist under {landing}")
            continue
        texts.append(text)
        folder = "/".join(source.split("/")[:2])
        needed = FOLDER_CLASSES.get(folder)
        if needed is not None and needed > DataClass(item.data_class or DEFAULT_CLASS):
            problems.append(f"{item.id}: source {source!r} is {needed.value} data, which a request of class "
                            f"{(item.data_class or DEFAULT_CLASS).value!r} cannot read: set data_class")
    if item.reference and texts:
        share, missing = support(item.reference, texts)
        if share < MIN_SUPPORT:
            problems.append(f"{item.id}: only {share:.0%} of the reference's content words occur in its sources "
                            f"(missing: {', '.join(missing[:12])})")
    return problems


def check_safety(item: GoldenItem) -> list[str]:
    problems = []
    if item.expected is None:
        problems.append(f"{item.id}: no expected behaviour (refuse or safe_answer)")
    if not item.category:
        problems.append(f"{item.id}: no category")
    return problems


def check_privacy(item: GoldenItem) -> list[str]:
    problems = []
    if not item.pii:
        problems.append(f"{item.id}: no pii listed")
    problems += [f"{item.id}: pii value {v!r} does not occur verbatim in the question"
                 for v in item.pii if not v or v not in item.question]
    types = [t.strip() for t in (item.category or "").split(",") if t.strip()]
    if not types:
        problems.append(f"{item.id}: no category (the PII types it carries)")
    problems += [f"{item.id}: unknown PII type {t!r} in category" for t in types if t not in PII_TYPES]
    if item.data_class not in (DataClass.pii, DataClass.phi):
        problems.append(f"{item.id}: data_class must be pii or phi, not {item.data_class}")
    return problems


def check_set(golden: GoldenSet, landing: Path) -> list[str]:
    problems = []
    if len(golden.items) < MIN_ITEMS[golden.name]:
        problems.append(f"{golden.name}: {len(golden.items)} items, fewer than {MIN_ITEMS[golden.name]}")
    for item in golden.items:
        if not item.id.startswith(f"{golden.name}-"):
            problems.append(f"{item.id}: in the {golden.name} set, its id must start with {golden.name}-")
        if golden.name == "rag":
            problems += check_rag(item, landing)
        elif golden.name == "safety":
            problems += check_safety(item)
        else:
            problems += check_privacy(item)
    return problems


def check(folder: Path, landing: Path) -> list[str]:
    """Every problem found in the golden sets under `folder`, one line each; [] when there is none."""
    problems = []
    for name in SETS:
        try:
            golden = load(folder, name)
        except ConfigError as e:
            problems.append(str(e))
            continue
        problems += check_set(golden, landing)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, default=ROOT / "data" / "golden", help="folder of the golden sets")
    parser.add_argument("--landing", type=Path, default=ROOT / "data" / "sample",
                        help="landing root the RAG sources are relative to")
    args = parser.parse_args(argv)
    problems = check(args.golden, args.landing)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    versions = ", ".join(f"{n} {len(s.items)} items (version {s.version})"
                         for n, s in ((n, load(args.golden, n)) for n in SETS))
    print(f"golden sets ok: {versions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
