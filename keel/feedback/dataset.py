"""A zone's fine-tuning dataset: the kept exchanges its users liked or corrected, scrubbed, versioned.

One JSONL line per request (a request rated by several keys is one line), in chat format:

    {"messages": [...the messages the model saw..., {"role": "assistant", "content": <answer>}]}

- A request is in when its raters' mean score is at least `POSITIVE` (0.5), or when someone corrected
  it: then the correction is the answer (the newest correction, if several keys gave one), whatever the
  score, because a correction is the answer someone preferred.
- Messages keep their role and their text (content parts joined, as the store reads them). Exchanges
  with tool calls or tool results are left out, and counted: their arguments are JSON a text scrubber
  could break, and the chat format here has no place for them.
- One token format for the whole dataset, the batch's typed one: request placeholders (`<PERSON_1>`,
  or `[PERSON_1]` and `PERSON_1` as models rewrite them) and hashed batch tokens (`[PERSON:7f3a9c01]`,
  in retrieved passages) become `[PERSON]`; then every text is scrubbed again with the PII engine, as
  the pipeline scrubs documents, so a value an earlier step missed does not reach training.

Versions live in the zone's storage as snapshots (keel.pipeline.snapshots) of the store
`feedback_dataset`: `feedback_dataset/snapshots/<version>/train.jsonl` and its `_manifest.json`, with
`feedback_dataset/CURRENT` naming the newest. The version is a hash of train.jsonl, so an unchanged
dataset is not published again; the last `keep` versions are kept. A version holding an exchange
whose retention has run out is deleted with the exchange (`expire_versions`): the manifest records
the earliest expiry of its exchanges.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keel.feedback.prompts import Variant
from keel.messages import text_of
from keel.pipeline.snapshots import SnapshotStore
from keel.privacy.redact import redact_spans
from keel.storage import ZoneStorage

if TYPE_CHECKING:
    from keel.feedback.store import ZoneStore
    from keel.privacy.engine import PrivacyEngine

STORE = "feedback_dataset"  # the snapshot store, and the zone's asset (keel_<zone>_feedback_dataset)
TRAIN = "train.jsonl"
POSITIVE = 0.5  # a request whose raters' mean score reaches this is rated well


@dataclass(frozen=True)
class Example:
    """One line of the dataset, before it is scrubbed: a kept exchange and the answer to learn."""

    tenant: str
    request_id: str
    messages: list[dict[str, str]]  # role and text
    answer: str  # the newest correction, else the model's answer
    corrected: bool
    score: float  # the raters' mean
    target: str
    prompt: str  # the prompt variant (keel-rag@1), or "none"
    data_class: str
    expires_at: float


def select(rows: Iterable[Mapping[str, Any]]) -> tuple[list[Example], Counter[str]]:
    """The examples in `rows` (ZoneStore.rated_exchanges: one row per request and rating key), in row
    order, and why the others were left out."""
    by_request: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        by_request.setdefault((r["tenant"], r["request_id"]), []).append(r)
    out: list[Example] = []
    left_out: Counter[str] = Counter()
    for (tenant, request_id), ratings in by_request.items():
        first = ratings[0]
        score = sum(float(r["score"]) for r in ratings) / len(ratings)
        corrections = sorted((r for r in ratings if (r["correction"] or "").strip()), key=lambda r: r["updated_at"])
        if not corrections and score < POSITIVE:
            left_out["rated_low"] += 1
            continue
        if any(m.get("tool_calls") or m.get("role") == "tool" for m in first["messages"]):
            left_out["tool_calls"] += 1
            continue
        out.append(Example(
            tenant, request_id,
            [{"role": str(m["role"]), "content": text_of(m.get("content"))} for m in first["messages"]],
            corrections[-1]["correction"] if corrections else first["answer"], bool(corrections), score,
            first["target"] or "none", variant(first["prompt"], first["prompt_version"]),
            first["data_class"] or "none", float(first["expires_at"])))
    return out, left_out


def variant(prompt: str | None, version: int | None) -> str:
    return Variant(prompt, int(version or 0), "").id if prompt else "none"


# -- one token format, then the engine again ----------------------------------------------------


class Scrubber:
    """Every text of the examples into the batch's typed tokens, PII the earlier steps missed included."""

    def __init__(self, engine: PrivacyEngine) -> None:
        from keel.privacy.engine import DEFAULT_ENTITIES

        self.engine = engine
        types = sorted({*DEFAULT_ENTITIES, *(engine.entities or []), *engine.analyzer.get_supported_entities()},
                       key=len, reverse=True)
        names = "|".join(map(re.escape, types))
        # Known types only, as the engine's own marks: "[JOHN]" or "<H_1>" in someone's text stays theirs.
        self.marks = re.compile(rf"\[({names}):[0-9a-f]{{8}}\]|[<\[]?\b({names})_\d+\b[>\]]?")

    def unify(self, text: str) -> tuple[str, Counter[str]]:
        """Request placeholders and hashed tokens as `[TYPE]`, and how many of each type there were."""
        seen: Counter[str] = Counter()

        def typed(m: re.Match[str]) -> str:
            kind = m.group(1) or m.group(2)
            seen[kind] += 1
            return f"[{kind}]"

        return self.marks.sub(typed, text), seen

    def __call__(self, examples: Sequence[Example]) -> tuple[list[Example], Counter[str], Counter[str]]:
        """(the examples scrubbed, tokens unified by type, values found again by type)."""
        texts = [t for x in examples for t in (*(m["content"] for m in x.messages), x.answer)]
        tokens: Counter[str] = Counter()
        unified = []
        for t in texts:
            u, seen = self.unify(t)
            unified.append(u)
            tokens.update(seen)
        spans = self.engine.detect_batch(unified)
        findings = Counter(s.type for found in spans for s in found)
        clean = iter([redact_spans(t, s, "typed") for t, s in zip(unified, spans, strict=True)])
        out = []
        for x in examples:
            messages = [{"role": m["role"], "content": next(clean)} for m in x.messages]
            out.append(replace(x, messages=messages, answer=next(clean)))
        return out, tokens, findings


# -- the dataset, and its versions in the zone's storage ------------------------------------------


@dataclass
class Dataset:
    """One build: train.jsonl's bytes and what its manifest says of them (no text)."""

    lines: bytes
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return hashlib.sha256(self.lines).hexdigest()[:32]

    @property
    def rows(self) -> int:
        return int(self.fields["rows"])


def build(store: ZoneStore, engine: PrivacyEngine, now: float) -> Dataset:
    """The zone's dataset from its store as of `now` (expired exchanges are not read)."""
    rows = store.rated_exchanges(now, min_score=0.0)  # every rating: the mean needs them
    examples, left_out = select(rows)
    examples, tokens, findings = Scrubber(engine)(examples)
    lines = "".join(json.dumps({"messages": [*x.messages, {"role": "assistant", "content": x.answer}]},
                               ensure_ascii=False) + "\n" for x in examples).encode()
    return Dataset(lines, {
        "format": "openai-chat-jsonl", "rows": len(examples), "min_score": POSITIVE,
        "counts": {
            "corrected": sum(x.corrected for x in examples),
            "by_target": _count(x.target for x in examples),
            "by_prompt": _count(x.prompt for x in examples),
            "by_data_class": _count(x.data_class for x in examples),
            "by_tenant": _count(x.tenant for x in examples),
            "left_out": dict(sorted(left_out.items())),
        },
        "tokens_unified": dict(sorted(tokens.items())),
        "findings": dict(sorted(findings.items())),
        "requests": [[x.tenant, x.request_id] for x in examples],  # line order; links to the audit trail
        "expires_at": min((x.expires_at for x in examples), default=None),
        "source_sha256": source_hash(rows),
    })


def source_hash(rows: Iterable[Mapping[str, Any]]) -> str:
    """What a build read, pinned without its text: each rating's request, key and time, each exchange's expiry."""
    ids = [[r["tenant"], r["request_id"], r["key_id"], r["updated_at"], r["expires_at"]] for r in rows]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def _count(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


@dataclass(frozen=True)
class Published:
    status: str  # "published", "unchanged" (the current version holds the same bytes) or "empty"
    manifest: dict[str, Any] | None  # the current version's (None: none yet)


def versions(storage: ZoneStorage, keep: int = 3) -> SnapshotStore:
    return SnapshotStore(storage, STORE, keep=keep)


def publish(storage: ZoneStorage, ds: Dataset, now: float, keep: int = 3) -> Published:
    """Commit `ds` as the current version unless it already is. An empty dataset is published only
    to replace one that was not (its exchanges are gone): with no version yet, there is nothing to say."""
    store = versions(storage, keep)
    current = store.current()
    if current is not None and current["key"] == ds.version:
        return Published("unchanged", current)
    if ds.rows == 0 and current is None:
        return Published("empty", current)
    staging = store.begin(ds.version)
    staging.write_bytes(ds.lines, TRAIN)
    created = datetime.fromtimestamp(now, UTC).isoformat()
    return Published("published", store.commit(staging, {"version": ds.version, "created_at": created, **ds.fields}))


def read(storage: ZoneStorage, version: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A version's manifest and lines (the current one by default), as a training job reads them."""
    store = versions(storage)
    manifest = store.resolve(version)
    lines = store.read_file(manifest["key"], TRAIN).decode().splitlines()
    return manifest, [json.loads(line) for line in lines]


def expire_versions(storage: ZoneStorage, now: float) -> list[str]:
    """Delete every version holding an exchange whose retention ended by `now` (CURRENT too, when it
    names one: the next build publishes what is left). Returns the versions deleted."""
    store = versions(storage)
    current = store.current()
    gone = []
    for key in storage.listdir(STORE, "snapshots"):
        manifest = store.committed(key)
        if manifest is not None and manifest.get("expires_at") is not None and manifest["expires_at"] <= now:
            if current is not None and current["key"] == key:
                storage.fs.delete_file(storage.path(STORE, "CURRENT"))
            storage.delete_dir(STORE, "snapshots", key)
            gone.append(key)
    return gone

