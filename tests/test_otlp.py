"""The OTLP exporter against a real HTTP server (a collector stand-in that records what it gets): traces
are batched, decoded as sent, retried when the collector says so, and every trace it loses is counted:
dropped (its queue was full) or failed (refused, or still failing after the retries)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from keel.telemetry.otlp import Exporter
from keel.telemetry.spans import SpanRecord, TraceRecord


class Collector:
    def __init__(self) -> None:
        self.bodies: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.answers: list[int] = []  # statuses to give, in order; then 200
        self.delay_s = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(outer.delay_s)
                status = outer.answers.pop(0) if outer.answers else 200
                if status == 200:
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    outer.bodies.append(req)
                    outer.headers.append(dict(self.headers))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        return [s for b in self.bodies for rs in b.resource_spans for ss in rs.scope_spans for s in ss.spans]


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.server.shutdown()


def trace(i: int) -> TraceRecord:
    now = time.time_ns()
    root = SpanRecord("request", now, now + 1000, attributes={"keel.n": i, "keel.ok": True, "keel.ms": 1.5})
    child = SpanRecord("attempt a", now + 10, now + 900, parent_id=root.span_id, error="cut",
                       attributes={"usage": {"input_tokens": 3}, "ranked": ["a", "b"]})
    return TraceRecord([root, child], {"keel.request_id": f"req-{i}"})


def test_traces_are_batched_and_arrive_as_sent(collector):
    counts: list[tuple[str, int]] = []
    ex = Exporter(collector.url, lambda: {"x-mlflow-experiment-id": "7"}, service="keel-test", gather_s=0.3,
                  on_count=lambda o, n: counts.append((o, n)))
    for i in range(20):
        ex.submit(trace(i) if i % 2 else (lambda i=i: trace(i)))  # a trace, or its builder
    assert ex.flush(10)
    ex.close()
    assert ex.exported == 20 and ex.dropped == ex.failed == 0 and sum(n for o, n in counts if o == "exported") == 20
    assert len(collector.bodies) < 20  # batched, not one request per trace
    assert collector.headers[0]["x-mlflow-experiment-id"] == "7"
    spans = collector.spans()
    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == 20 and len(spans) == 40
    attrs = {a.key: a.value for a in roots[0].attributes}
    assert attrs["mlflow.traceTag.keel.request_id"].string_value.startswith("req-")
    assert attrs["keel.ok"].bool_value is True and attrs["keel.ms"].double_value == 1.5
    child = next(s for s in spans if s.parent_span_id)
    assert child.status.code == child.status.STATUS_CODE_ERROR and child.status.message == "cut"
    cattrs = {a.key: a.value for a in child.attributes}
    assert cattrs["usage"].kvlist_value.values[0].value.int_value == 3
    assert [v.string_value for v in cattrs["ranked"].array_value.values] == ["a", "b"]


def test_a_retryable_answer_is_retried_and_a_refusal_is_counted_as_failed(collector):
    collector.answers = [503, 200]
    ex = Exporter(collector.url, {}, service="t", gather_s=0.05, retries=2)
    ex.submit(trace(1))
    assert ex.flush(10) and ex.exported == 1 and ex.failed == 0
    collector.answers = [400]
    ex.submit(trace(2))
    assert ex.flush(10) and ex.failed == 1 and ex.exported == 1
    ex.close()


def test_a_full_queue_drops_and_counts_and_nothing_is_lost_silently(collector):
    collector.delay_s = 0.5  # the collector is slow: the queue fills behind the batch in flight
    ex = Exporter(collector.url, {}, service="t", max_queue=5, max_batch=1, gather_s=0.01)
    accepted = sum(ex.submit(trace(i)) for i in range(50))
    assert ex.flush(30)
    ex.close()
    assert ex.dropped == 50 - accepted > 0
    assert ex.exported + ex.dropped + ex.failed == 50 and len(collector.spans()) == 2 * ex.exported


def test_an_unreachable_collector_fails_counted_without_stopping_the_thread():
    ex = Exporter("http://127.0.0.1:9/v1/traces", {}, service="t", gather_s=0.01, retries=1, timeout_s=1)
    ex.submit(trace(1))
    assert ex.flush(10) and ex.failed == 1
    ex.submit(trace(2))
    assert ex.flush(10) and ex.failed == 2
    ex.close()
