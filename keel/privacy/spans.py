"""Detected PII spans and how overlapping detections are resolved. Pure logic."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, order=True)
class Span:
    """A detected entity: `text[start:end]` is of `type` with confidence `score`."""

    start: int
    end: int
    type: str
    score: float

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["score"] = round(self.score, 4)
        return {"type": d["type"], "start": d["start"], "end": d["end"], "score": d["score"]}


def resolve_overlaps(spans: list[Span]) -> list[Span]:
    """Merge overlapping detections into non-overlapping spans, sorted by start.

    Overlapping spans are unioned (a scrubber must cover every character any recognizer
    flagged); the merged span takes the type of its highest-scoring member, ties going to
    the longer one, and that member's score.
    """
    merged: list[tuple[int, int, Span]] = []  # (start, end, representative)
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        if s.end <= s.start:
            continue
        if merged and s.start < merged[-1][1]:
            start, end, rep = merged[-1]
            if (s.score, s.end - s.start) > (rep.score, rep.end - rep.start):
                rep = s
            merged[-1] = (start, max(end, s.end), rep)
        else:
            merged.append((s.start, s.end, s))
    return [Span(start, end, rep.type, rep.score) for start, end, rep in merged]
