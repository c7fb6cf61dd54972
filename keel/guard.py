"""The guard on the gateway's request path: what a model target sees, and what the caller gets back.

Before any target: every message is pseudonymized with one vault per request (`<PERSON_1>` is the
same person in every message), so the target sees placeholders only. On the way back, the answer
passes through `AnswerGuard`, piece by piece as it streams:

1. checks, per segment (a sentence, or up to `SEGMENT_CHARS`): PII the model wrote that the caller
   never sent (an identifier: an SSN, an email...) is replaced by its type (`[US_SSN]`), and toxicity
   is scored, flagged or blocked;
2. restore: the caller's own values replace the placeholders, even when a placeholder arrives
   split across stream chunks (`StreamRestorer`).

Checks run on the model's text, before restore, so the caller's own values are never mistaken for
new PII. Whether a request is pseudonymized at all is the policy's decision (`Policy.pseudonymizes`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from keel.privacy.pseudonymize import PLACEHOLDER, StreamRestorer, Vault, pseudonymize_spans
from keel.privacy.redact import redact_spans
from keel.privacy.spans import Span, resolve_overlaps
from keel.settings import GuardSettings, PrivacySettings

logger = logging.getLogger("keel.guard")
MEMO_TEXTS = 4096  # texts whose findings a replica remembers (a retrieved passage, a turn of a conversation)
SEGMENT_CHARS = 400  # a streamed answer without a sentence end is checked at least this often
_SENTENCE_END = re.compile(r"[.!?;:](?=\s)|\n")


@dataclass
class Protected:
    """A request as targets get it, and what the gateway keeps to answer the caller."""

    body: dict[str, Any]
    vault: Vault
    entities: dict[str, int]  # PII found in what the caller sent, by type
    source: str  # all the caller sent: a value found here is the caller's own, not the model's invention


@dataclass
class Actions:
    """What the guard did to one request, for the audit trail (counts and scores, never values)."""

    pseudonymized: bool = False
    entities: dict[str, int] = field(default_factory=dict)
    output_redacted: Counter[str] = field(default_factory=Counter)
    toxicity: float = 0.0
    toxicity_action: str | None = None  # "flagged" or "blocked"
    output_error: bool = False  # the answer check failed: the rest of the answer was withheld

    def record(self) -> dict[str, Any]:
        return {"pseudonymized": self.pseudonymized, "pii_entities": self.entities,
                "output_redacted": dict(self.output_redacted), "toxicity": round(self.toxicity, 4),
                "toxicity_action": self.toxicity_action, "output_error": self.output_error}


class Guard:
    """One per gateway replica: loads the PII engine (and the toxicity model) once."""

    def __init__(self, settings: GuardSettings, privacy: PrivacySettings) -> None:
        from keel.privacy.engine import PrivacyEngine

        self.settings = settings
        self.engine = PrivacyEngine(privacy)
        # Findings by the text's hash: a popular passage, or a conversation's earlier turns (sent again
        # with every turn), are analysed once. Spans only: offsets, types and scores, never a value.
        self._memo: OrderedDict[bytes, list[Span]] = OrderedDict()
        self._memo_lock = threading.Lock()
        self.output_entities = frozenset(settings.output_entities)
        self._toxicity = None
        if settings.toxicity != "off":
            from profanity_check import predict_prob  # scikit-learn models shipped in the wheel: offline

            self._toxicity = predict_prob

    def protect(self, body: dict[str, Any], pieces: Mapping[int, Sequence[tuple[int, int]]] | None = None,
                keep: frozenset[str] = frozenset()) -> Protected:
        """The body with every text it holds pseudonymized (one vault for the whole request), but for
        entity types in `keep` (the class's: Policy.kept_entities). `pieces` names, by message index,
        spans of a message's text analysed each on its own: the retrieved passages of a RAG request
        (serving.request.ground), so a passage that comes back is not analysed again."""
        body = dict(body)  # the caller's object stays as sent, to its top level
        slots = _text_slots(body)
        texts = [get() for _, get, _ in slots]
        cuts = [_cut(text, (pieces or {}).get(message, ()) if message is not None else ())
                for (message, _, _), text in zip(slots, texts, strict=True)]
        found = [[s for s in spans if s.type not in keep] for spans in self._detect(cuts)]
        vault = Vault()
        entities: Counter[str] = Counter()
        for (_, _, put), text, spans in zip(slots, texts, found, strict=True):
            if spans:
                put(pseudonymize_spans(text, spans, vault, avoid=tuple(texts))[0])
                entities.update(s.type for s in spans)
        if vault.values and self.settings.placeholder_note and isinstance(body.get("messages"), list):
            body["messages"] = _noted(body["messages"], self.settings.placeholder_note)
        return Protected(body, vault, dict(entities), "\n".join(texts))

    def _detect(self, cuts: list[list[tuple[int, str]]]) -> list[list[Span]]:
        """Each text's spans, from its pieces ((offset, text) each): remembered pieces are not analysed again."""
        keys = {piece: hashlib.sha256(piece.encode()).digest() for cut in cuts for _, piece in cut}
        with self._memo_lock:
            known = {k: self._memo[k] for k in set(keys.values()) if k in self._memo}
            for k in known:
                self._memo.move_to_end(k)
        todo = list(dict.fromkeys(p for p, k in keys.items() if k not in known))
        if todo:
            fresh = dict(zip((keys[p] for p in todo), self.engine.detect_batch(todo), strict=True))
            known |= fresh
            with self._memo_lock:
                self._memo.update(fresh)
                while len(self._memo) > MEMO_TEXTS:
                    self._memo.popitem(last=False)
        return [resolve_overlaps([replace(s, start=s.start + offset, end=s.end + offset)
                                  for offset, piece in cut for s in known[keys[piece]]]) for cut in cuts]

    def scrub(self, texts: Sequence[str]) -> list[str]:
        """User text kept at rest (a feedback comment, an exchange that went to its model as sent): every
        PII value replaced by its type ([PERSON]), the batch pipeline's irreversible tokens."""
        found = self._detect([_cut(t, ()) for t in texts])
        return [redact_spans(t, spans, "typed") for t, spans in zip(texts, found, strict=True)]

    def unprotected(self, body: dict[str, Any]) -> Protected:
        """A request the policy lets through as sent: nothing to restore, the answer is still checked."""
        return Protected(body, Vault(), {}, "\n".join(get() for _, get, _ in _text_slots(body)))

    def check(self, text: str, protected: Protected, actions: Actions) -> tuple[str, bool]:
        """One segment of the model's answer after the output checks, and whether it is blocked."""
        if self.settings.output_pii == "redact":
            ours = [m.span() for m in PLACEHOLDER.finditer(text) if m.group(0) in protected.vault.values]
            new = [s for s in self.engine.detect(text)
                   if s.type in self.output_entities and not any(s.start < end and start < s.end for start, end in ours)
                   and text[s.start:s.end] not in protected.source]
            if new:
                actions.output_redacted.update(s.type for s in new)
                text = redact_spans(text, new, "typed")
        if self._toxicity is not None and text.strip():
            score = float(self._toxicity([text])[0])
            actions.toxicity = max(actions.toxicity, score)
            if score >= self.settings.toxicity_threshold:
                actions.toxicity_action = "blocked" if self.settings.toxicity == "block" else "flagged"
                return ("", True) if self.settings.toxicity == "block" else (text, False)
        return text, False

    @property
    def checks_output(self) -> bool:
        return self.settings.output_pii != "off" or self._toxicity is not None


class AnswerGuard:
    """A model's answer -> the caller's answer, fed piece by piece (a whole answer is one piece)."""

    def __init__(self, guard: Guard, protected: Protected, actions: Actions) -> None:
        self.guard, self.protected, self.actions = guard, protected, actions
        self.restorer = StreamRestorer(protected.vault)
        self.pending = ""
        self.blocked = False
        self._calls: dict[int, StreamRestorer] = {}  # per streamed tool call: its arguments come in pieces

    async def feed(self, text: str, final: bool = False) -> str:
        """What the caller may see now. Checks run in a worker thread: spaCy would stall the event loop."""
        if self.blocked:
            return ""
        if not self.guard.checks_output:
            return self.restorer.feed(text) + (self.restorer.end() if final else "")
        out = []
        for segment in self._segments(text, final):
            try:
                checked, self.blocked = await asyncio.to_thread(self.guard.check, segment, self.protected, self.actions)
            except Exception:  # fail closed: an unchecked answer is not passed on
                logger.exception("the answer check failed; the rest of the answer is withheld")
                checked, self.blocked, self.actions.output_error = "", True, True
            out.append(self.restorer.feed(checked))
            if self.blocked:
                return "".join(out)
        if final:
            out.append(self.restorer.end())
        return "".join(out)

    async def stream(self, first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A target's chunks (`first`, then `rest`) as the caller's: checked, values restored. A blocked
        answer ends at once with finish_reason "content_filter"."""
        chunk = first
        while chunk is not None:
            text = await self.feed(chunk.text, final=chunk.finish_reason is not None)
            if self.blocked:
                yield replace(chunk, text=text, tool_calls=None, finish_reason="content_filter")
                return
            yield replace(chunk, text=text, tool_calls=self.tool_calls(chunk.tool_calls))
            chunk = await anext(rest, None)

    def _segments(self, text: str, final: bool) -> list[str]:
        self.pending += text
        if final:
            segment, self.pending = self.pending, ""
            return [segment] if segment else []
        cut = 0
        for m in _SENTENCE_END.finditer(self.pending):
            cut = m.end()
        if not cut and len(self.pending) >= SEGMENT_CHARS:
            cut = max(self.pending.rfind(" "), self.pending.rfind("\n")) + 1 or len(self.pending)
        if not cut:
            return []
        segment, self.pending = self.pending[:cut], self.pending[cut:]
        return [segment]

    def tool_calls(self, calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """Tool-call deltas (or whole calls) with the caller's values back in their arguments."""
        if not calls or not self.protected.vault.values:
            return calls
        out = []
        for c in calls:
            fn = c.get("function") or {}
            if fn.get("arguments"):
                restorer = self._calls.setdefault(c.get("index", 0), StreamRestorer(self.protected.vault))
                c = {**c, "function": {**fn, "arguments": restorer.feed(fn["arguments"])}}
            out.append(c)
        return out


def _noted(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    """The messages with `note` opening the system message (one is added if there is none)."""
    first = messages[0] if messages else {}
    if first.get("role") in ("system", "developer") and isinstance(first.get("content"), str):
        return [{**first, "content": f"{note}\n\n{first['content']}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def _cut(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, str]]:
    """`text` as (offset, piece) pieces: each of `spans` (sorted, disjoint) and the text between them."""
    out, at = [], 0
    for start, end in [*spans, (len(text), len(text))]:
        if start < at or end > len(text):
            raise ValueError(f"piece {start}:{end} is not within the text after offset {at}")
        out += [(a, text[a:b]) for a, b in ((at, start), (start, end)) if b > a]
        at = end
    return out


def _text_slots(body: dict[str, Any]) -> list[tuple[int | None, Any, Any]]:
    """(message index, read, write) for every text a caller sent: the prompt (no message), each
    message's content (string or text parts), the arguments of tool calls in the history, the `user`
    field (an end user's id, often an email) and the tools' descriptions. Writes replace the body's
    containers with copies, so the caller's request object is never changed in place."""
    slots: list[tuple[int | None, Any, Any]] = []
    for name in ("prompt", "user"):
        if isinstance(body.get(name), str):
            slots.append((None, lambda n=name: body[n], lambda v, n=name: body.__setitem__(n, v)))
    if body.get("tools"):
        body["tools"] = tools = [{**t, "function": dict(t.get("function") or {})} for t in body["tools"]]
        for t in tools:
            if isinstance(t["function"].get("description"), str):
                fn = t["function"]
                slots.append((None, lambda fn=fn: fn["description"], lambda v, fn=fn: fn.__setitem__("description", v)))
    if "messages" in body:
        body["messages"] = messages = [dict(m) for m in body["messages"]]
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, str):
                slots.append((i, lambda m=m: m["content"], lambda v, m=m: m.__setitem__("content", v)))
            elif isinstance(content, list):
                m["content"] = parts = [dict(p) for p in content]
                for p in parts:  # a message's pieces name its string content: parts are analysed whole
                    if p.get("type") == "text" and isinstance(p.get("text"), str):
                        slots.append((None, lambda p=p: p["text"], lambda v, p=p: p.__setitem__("text", v)))
            if m.get("tool_calls"):
                m["tool_calls"] = calls = [{**c, "function": dict(c.get("function") or {})} for c in m["tool_calls"]]
                for c in calls:
                    if isinstance(c["function"].get("arguments"), str):
                        fn = c["function"]
                        slots.append((None, lambda fn=fn: fn["arguments"],
                                      lambda v, fn=fn: fn.__setitem__("arguments", v)))
    return slots

