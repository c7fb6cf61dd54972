"""Scrub: raw records -> redacted documents, or quarantined records with their reason.

`Scrubber` is the batch function the Ray job runs in an actor pool (Presidio and spaCy load once
per actor). Each data class is redacted the way policy says (typed or keyed-hash tokens), never
with the request-time `<PERSON_1>` placeholders. Finding counts per entity type are kept per
document; the values themselves never leave the text they were found in.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import pyarrow as pa

from keel.pipeline.documents import METADATA, decode
from keel.privacy.redact import redact_spans
from keel.settings import KeelSettings

# findings: JSON {entity type: count}
DOCS_SCHEMA = pa.schema([*METADATA, ("title", pa.string()), ("text", pa.string()), ("findings", pa.string())])
# A record that cannot be used, kept as received (inside the zone) with its reason, for a fix and re-run.
QUARANTINE_SCHEMA = pa.schema([*METADATA, ("reason", pa.string()), ("payload", pa.binary())])
# One output schema for both kinds, split by the driver: Ray Data blocks need one schema.
SCRUB_OUT_SCHEMA = pa.schema([*DOCS_SCHEMA, ("reason", pa.string()), ("payload", pa.binary())])


class Scrubber:
    def __init__(self, settings: KeelSettings, own_process: bool = False) -> None:
        import contextlib

        from keel.privacy import without_torch

        self.settings = settings
        with without_torch() if own_process else contextlib.nullcontext():  # never in a process that has torch
            from keel.privacy.engine import PrivacyEngine

            self.engine = PrivacyEngine(settings.privacy)
        self.key = settings.hash_key()
        self.modes = {dc.value: rule.redaction for dc, rule in settings.policy.data_classes.items()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict[str, Any]] = []
        good: list[tuple[dict[str, Any], str, str | None]] = []
        for r in rows:
            base = {k: r[k] for k in METADATA.names}
            if r["format"] == "unsupported":
                out.append({**base, "reason": "unsupported file type", "payload": r["payload"]})
                continue
            d = decode(r["format"], r["payload"], self.settings.pipeline.max_doc_bytes)
            if d.error:
                out.append({**base, "reason": d.error, "payload": r["payload"]})
            else:
                good.append((base, d.text or "", d.title))
        texts = [t for _, t, _ in good]
        titles = [title or "" for _, _, title in good]
        spans = self.engine.detect_batch(texts + titles)
        for i, (base, text, title) in enumerate(good):
            mode = self.modes[base["data_class"]]
            text_spans, title_spans = spans[i], spans[len(good) + i]
            counts = Counter(s.type for s in (*text_spans, *title_spans))
            out.append(
                {
                    **base,
                    "title": redact_spans(title, title_spans, mode, self.key) if title else None,
                    "text": redact_spans(text, text_spans, mode, self.key),
                    "findings": json.dumps(dict(sorted(counts.items()))),
                }
            )
        return pa.Table.from_pylist(out, schema=SCRUB_OUT_SCHEMA)


def split(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(scrubbed documents, quarantined records) from the scrubber's combined output."""
    import pyarrow.compute as pc

    bad = pc.is_valid(table["reason"])
    docs = table.filter(pc.invert(bad)).select(DOCS_SCHEMA.names).cast(DOCS_SCHEMA)
    quarantined = table.filter(bad).select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
    return docs, quarantined


def findings_total(docs: pa.Table) -> dict[str, int]:
    total: Counter[str] = Counter()
    for f in docs["findings"].to_pylist():
        total.update(json.loads(f))
    return dict(sorted(total.items()))


def quarantine_reasons(quarantined: pa.Table) -> dict[str, int]:
    """Counts by kind of reason (numbers masked: "document is N bytes, above the limit of N")."""
    return dict(sorted(Counter(re.sub(r"(?<![\w-])\d+", "N", r) for r in quarantined["reason"].to_pylist()).items()))
