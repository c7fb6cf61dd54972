"""Prometheus metrics of one gateway replica, served at /metrics.

Each replica keeps its own registry (no shared state on the hot path). With several replicas,
scrape each one (Ray Serve's replica metrics) or run one replica per scrape target.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BREAKER = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    def __init__(self, states: Mapping[str, Any]) -> None:
        self.states = states
        r = self.registry = CollectorRegistry()
        self.requests = Counter("keel_gateway_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("keel_gateway_request_seconds", "Whole-request latency", ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.ttft = Histogram("keel_gateway_ttft_seconds", "Time to first token", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.failovers = Counter("keel_gateway_failovers", "Targets given up on, by reason", ["target", "error"],
                                 registry=r)
        self.served = Counter("keel_gateway_target_served", "Requests answered, by final target", ["target"],
                              registry=r)
        self.breaker = Gauge("keel_gateway_breaker_state", "0 closed, 1 half-open, 2 open", ["target"], registry=r)
        self.audit_failures = Counter("keel_gateway_audit_failures", "Audit records that could not be written",
                                      registry=r)
        self.feedback_links = Counter("keel_gateway_feedback_link_failures",
                                      "Answers whose feedback link (or kept exchange) could not be written",
                                      registry=r)
        self.feedback = Counter("keel_gateway_feedback", "Feedback received, by rating (up, down, or score)",
                                ["rating"], registry=r)
        self.in_flight = Gauge("keel_gateway_in_flight", "Requests in flight on this replica", registry=r)

        self._children: dict[tuple[Any, ...], Any] = {}  # labels() takes a lock and builds a key: once per series

    def _series(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        if (child := self._children.get(key)) is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, endpoint: str, status: int) -> None:
        self._series(self.requests, endpoint, str(status)).inc()

    def finish(self, endpoint: str, status: int, outcome: Any, seconds: float) -> None:
        self.request(endpoint, status)
        self._series(self.latency, endpoint).observe(seconds)
        if outcome.ttft_s is not None:
            self.ttft.observe(outcome.ttft_s)
        for f in outcome.failovers:
            self._series(self.failovers, f["target"], f["error"]).inc()
        if status == 200 and outcome.target:
            self._series(self.served, outcome.target).inc()

    def audit_failed(self) -> None:
        self.audit_failures.inc()

    def feedback_link_failed(self) -> None:
        self.feedback_links.inc()

    def feedback_received(self, rating: str) -> None:
        self._series(self.feedback, rating).inc()

    def render(self, in_flight: int) -> tuple[bytes, str]:
        self.in_flight.set(in_flight)
        for name, st in self.states.items():
            self.breaker.labels(name).set(BREAKER[st.breaker.status])
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
