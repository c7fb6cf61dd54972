"""A trace as Keel builds it: spans with explicit times, made after the fact (a request's stages are
timed while it runs; its trace is put together once the answer is out, off the event loop)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

Scalar = str | int | float | bool
AttrValue = Scalar | dict[str, Scalar] | list[str]  # maps and lists: OTLP kvlist and array values
TAG_PREFIX = "mlflow.traceTag."  # a root span attribute MLflow's OTLP ingestion turns into a trace tag


def new_trace_id() -> bytes:
    return os.urandom(16)


def new_span_id() -> bytes:
    return os.urandom(8)


@dataclass(slots=True)
class SpanRecord:
    name: str
    start_ns: int  # Unix epoch nanoseconds
    end_ns: int
    span_id: bytes = field(default_factory=new_span_id)
    parent_id: bytes | None = None  # None: the trace's root
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    error: str | None = None  # the span failed, and why (a kind, never a message carrying data)


@dataclass(slots=True)
class TraceRecord:
    spans: list[SpanRecord]  # the root first
    tags: dict[str, str] = field(default_factory=dict)  # what the trace is found by (request id, DAG run id)
    trace_id: bytes = field(default_factory=new_trace_id)

    def root_attributes(self) -> dict[str, AttrValue]:
        return self.spans[0].attributes | {TAG_PREFIX + k: v for k, v in self.tags.items()}
