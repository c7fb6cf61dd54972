"""Sending traces over OTLP/HTTP (protobuf), from a thread of its own.

`submit` only puts a finished trace on a bounded queue (no I/O, no encoding), so the caller (the
gateway's event loop, Airflow's scheduler) never waits on the trace backend. A BatchWriter's thread
gathers what arrived within `gather_s` (at most `max_batch` traces), encodes it as one
ExportTraceServiceRequest and posts it, retrying what OTLP calls retryable. What is lost is counted, never silent:

- `dropped`: the queue was full (the backend is slower than the traffic, or down for long);
- `failed`: a batch the backend refused, or that still failed after the retries.

The default backend is MLflow's tracking server (`POST /v1/traces`, experiment `keel-traces`); any
OTLP/HTTP collector takes the same requests.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from keel import mlflow_api
from keel.batching import BatchWriter
from keel.settings import KeelSettings
from keel.telemetry.spans import AttrValue, TraceRecord

log = logging.getLogger("keel.telemetry")

RETRYABLE = frozenset({429, 502, 503, 504})  # the OTLP/HTTP spec's retryable answers
EXPERIMENT_HEADER = "x-mlflow-experiment-id"
Counted = Callable[[str, int], None]  # (exported | dropped | failed, how many traces)
# A trace, or what builds it in the exporter's thread: the gateway hands over a few values and leaves
# the spans to be made off its event loop.
Item = TraceRecord | Callable[[], TraceRecord]


class Exporter:
    def __init__(self, endpoint: str, headers: Callable[[], Mapping[str, str]] | Mapping[str, str], *,
                 service: str, max_queue: int = 10_000, max_batch: int = 512, gather_s: float = 1.0,
                 timeout_s: float = 10.0, retries: int = 3, on_count: Counted | None = None) -> None:
        self.endpoint, self.service, self.retries, self.on_count = endpoint, service, retries, on_count
        # A callable is resolved in the thread, once it succeeds (MLflow's experiment id).
        self._headers = headers if callable(headers) else lambda: headers
        self._resolved: Mapping[str, str] | None = None
        self._http = httpx.Client(timeout=timeout_s)
        self._lock = threading.Lock()
        self.exported = self.dropped = self.failed = 0
        self._writer: BatchWriter[Item] = BatchWriter(lambda batch: self._settle(*self._send(batch)),
                                                      name="keel-otlp", max_queued=max_queue, gather_s=gather_s,
                                                      max_batch=max_batch)
        atexit.register(self.close)  # a short-lived process (`airflow dags test`, a Ray job) sends what it traced

    def submit(self, trace: Item) -> bool:
        """Queue a finished trace (or its builder); False (and counted) when the queue is full."""
        try:
            self._writer.submit(trace)
        except queue.Full:
            self._settle("dropped", 1)
            return False
        return True

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Whether everything submitted so far was exported or counted within `timeout_s`."""
        return self._writer.flush(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self._writer.close(timeout_s)
        self._http.close()

    # -- the writer's thread --------------------------------------------------------------------

    def _settle(self, outcome: str, n: int) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + n)
        if self.on_count is not None:
            try:
                self.on_count(outcome, n)
            except Exception:  # a metrics failure must not lose the count of what the thread sent
                log.exception("trace count not recorded")

    def _send(self, batch: Sequence[Item]) -> tuple[str, int]:
        try:
            traces = [t if isinstance(t, TraceRecord) else t() for t in batch]
        except Exception:  # a builder's bug must not stop the thread: the batch is lost, and counted
            log.exception("traces could not be built")
            return "failed", len(batch)
        body = encode(traces, self.service).SerializeToString()
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                headers = self._headers_now()
                r = self._http.post(self.endpoint, content=body,
                                    headers={**headers, "content-type": "application/x-protobuf"})
                if r.status_code < 300:
                    return "exported", len(batch)
                if r.status_code not in RETRYABLE:
                    log.warning("trace export refused: HTTP %s from %s", r.status_code, self.endpoint)
                    return "failed", len(batch)
            except (httpx.HTTPError, OSError, LookupError) as e:  # LookupError: the experiment not resolved
                if attempt == self.retries:
                    log.warning("trace export failed: %s: %s", type(e).__name__, e)
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        return "failed", len(batch)

    def _headers_now(self) -> Mapping[str, str]:
        if self._resolved is None:
            self._resolved = self._headers()
        return self._resolved


def encode(traces: Sequence[TraceRecord], service: str) -> ExportTraceServiceRequest:
    # Messages are filled in place (`add`, field by field): half the cost of building each one with
    # keyword arguments and copying it into its parent, which was most of the exporter thread's time.
    req = ExportTraceServiceRequest()
    resource_spans = req.resource_spans.add()
    service_name = resource_spans.resource.attributes.add(key="service.name")
    service_name.value.string_value = service
    scope = resource_spans.scope_spans.add()
    scope.scope.name = "keel"
    for t in traces:
        for i, s in enumerate(t.spans):
            span = scope.spans.add(trace_id=t.trace_id, span_id=s.span_id, parent_span_id=s.parent_id or b"",
                                   name=s.name, kind=Span.SPAN_KIND_SERVER if i == 0 else Span.SPAN_KIND_INTERNAL,
                                   start_time_unix_nano=s.start_ns, end_time_unix_nano=max(s.end_ns, s.start_ns))
            for k, v in (t.root_attributes() if i == 0 else s.attributes).items():
                _fill(span.attributes.add(key=k).value, v)
            if s.error is not None:
                span.status.code, span.status.message = Status.STATUS_CODE_ERROR, s.error
            else:
                span.status.code = Status.STATUS_CODE_OK
    return req


def _fill(out: AnyValue, v: AttrValue) -> None:
    if isinstance(v, str):
        out.string_value = v
    elif isinstance(v, bool):  # before int: a bool is an int
        out.bool_value = v
    elif isinstance(v, int):
        out.int_value = v
    elif isinstance(v, float):
        out.double_value = v
    elif isinstance(v, dict):
        out.kvlist_value.SetInParent()  # an empty map is still a map
        for k, x in v.items():
            _fill(out.kvlist_value.values.add(key=k).value, x)
    elif isinstance(v, list):
        out.array_value.SetInParent()
        for x in v:
            _fill(out.array_value.values.add(), x)
    else:
        out.string_value = str(v)


# -- MLflow as the backend ------------------------------------------------------------------------


def mlflow_experiment(tracking_uri: str, name: str, timeout_s: float = 10.0) -> str:
    """The id of MLflow experiment `name`, created when missing."""
    with httpx.Client(timeout=timeout_s) as http:
        return mlflow_api.experiment(http, tracking_uri, name)


def exporter_for(settings: KeelSettings, service: str, on_count: Counted | None = None) -> Exporter | None:
    """The exporter `settings.telemetry` asks for: to its OTLP endpoint if set, else to MLflow's
    tracking server; None when tracing is off or there is nowhere to send to."""
    t, uri = settings.telemetry, settings.pipeline.mlflow_tracking_uri or ""
    if not t.traces:
        return None
    if t.otlp_endpoint:
        return Exporter(t.otlp_endpoint, {}, service=service, max_queue=t.queue_max, on_count=on_count)
    if not uri.startswith("http"):  # a local file store takes no OTLP
        return None
    return Exporter(uri.rstrip("/") + "/v1/traces",
                    lambda: {EXPERIMENT_HEADER: mlflow_experiment(uri, t.experiment)},
                    service=service, max_queue=t.queue_max, on_count=on_count)
