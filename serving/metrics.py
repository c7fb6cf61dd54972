"""The gateway's metrics, on Ray's metrics pipeline: one scrape shows every replica.

Each replica records with `ray.util.metrics`; its Ray worker reports the series to the node's metrics agent, which
serves them with Ray's own (`ray_serve_*`, `ray_node_*`, ...) in Prometheus' format at
`http://<host>:<ports.ray_metrics>/metrics`. Ray names a series `ray_<name>` (a counter `ray_<name>_total`, a
histogram `_bucket`, `_sum` and `_count`) and adds its own labels: `WorkerId` (the replica's process, so each
replica has its series), `NodeAddress`, `SessionName`, `Version`, `Component` and `otel_scope_*`.

The gateway has no `GET /metrics` of its own (it is a 404 like any unknown path): a per-replica registry answered
from whichever replica took the scrape, and Serve's proxy gives a scraper no way to address each replica.

The address is unauthenticated, so label values come from bounded sets of Keel's own words (endpoints, statuses,
target names, error kinds, entity types, guard actions, ratings): never a tenant, a key, a request id or a text.

Cost: a Ray call takes about 2 us, 3 to 7 times prometheus_client's (measured in a Ray actor, Ray 2.60). So the
request path calls Ray only for its two histograms; counts go to a dict under a lock (about 0.3 us) and a thread
sends them to Ray every second, one call per series that moved, which Ray's report interval (10 s by default)
makes no later: an answer's metrics cost 7 us, against 18 us with a Ray call per count. The same thread sets the
gauges (in-flight, breaker states, standings): Ray reports a gauge only when it was set since its last report, and
its agent forgets a series two report intervals after the last one, so the state a target has left ages out of
the scrape. Tag dicts are built once per series.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.evaluation.standing import StandingBoard
    from keel.guard import Actions

BREAKER = {"closed": 0, "half_open": 1, "open": 2}
REFRESH_S = 1.0  # counts and gauges to Ray: its shortest report interval, so no report misses a gauge


def _ray() -> Any:
    """Ray's metrics module, imported when the first metric is made, not with this module: Ray reads some
    settings from the environment once, at import (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, its auth mode), and a
    process that imports serving before it sets them (a test session collecting its modules) would keep Ray's
    defaults and look for its cluster at the machine's address instead of 127.0.0.1."""
    from ray.util import metrics

    return metrics


class _Series:
    """A Ray metric and its tag dicts, one per label values."""

    def __init__(self, metric: Any, keys: tuple[str, ...]) -> None:
        self.metric, self.keys = metric, keys
        self._tags: dict[tuple[str, ...], dict[str, str]] = {}  # a race builds an equal dict: no lock

    def tags(self, values: tuple[str, ...]) -> dict[str, str]:
        if (t := self._tags.get(values)) is None:
            t = self._tags[values] = dict(zip(self.keys, values, strict=True))
        return t


class _Counter(_Series):
    """Counts kept here until `flush` sends them to Ray; `inc` from any thread."""

    def __init__(self, name: str, doc: str, *keys: str) -> None:
        super().__init__(_ray().Counter(name, doc, keys), keys)
        self._counts: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, by: float = 1) -> None:
        if by > 0:  # Ray refuses 0: no tokens, no cost
            with self._lock:
                self._counts[labels] = self._counts.get(labels, 0) + by

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        for labels, n in counts.items():
            self.metric.inc(n, self.tags(labels))


class _Histogram(_Series):
    def __init__(self, name: str, doc: str, buckets: list[float], *keys: str) -> None:
        super().__init__(_ray().Histogram(name, doc, buckets, keys), keys)

    def observe(self, value: float, *labels: str) -> None:
        self.metric.observe(value, self.tags(labels))


class _Gauge(_Series):
    def __init__(self, name: str, doc: str, *keys: str) -> None:
        super().__init__(_ray().Gauge(name, doc, keys), keys)

    def set(self, value: float, *labels: str) -> None:
        self.metric.set(value, self.tags(labels))


class Metrics:
    """One per replica. It counts each target's breaker transitions as they happen (it subscribes to the
    breakers of `states`); `start` starts the thread that sends the counts to Ray and sets the gauges."""

    def __init__(self, states: Mapping[str, Any]) -> None:
        self.states = states
        self.requests = _Counter("keel_gateway_requests", "Requests by endpoint and HTTP status", "endpoint", "status")
        self.latency = _Histogram("keel_gateway_request_seconds", "Whole-request latency",
                                  [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60], "endpoint")
        self.ttft = _Histogram("keel_gateway_ttft_seconds", "Time to first token",
                               [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
        self.failovers = _Counter("keel_gateway_failovers", "Targets given up on, by reason", "target", "error")
        self.served = _Counter("keel_gateway_target_served", "Requests answered, by final target", "target")
        self.tokens = _Counter("keel_gateway_tokens", "Tokens by answering target, input (prompt) or output",
                               "target", "direction")
        self.cost = _Counter("keel_gateway_cost", "What answers cost at their target's prices, USD", "target")
        self.guard_actions = _Counter("keel_gateway_guard_actions", "Requests the guard acted on: pseudonymized, "
                                      "redacted, flagged, blocked, withheld", "action")
        self.pii = _Counter("keel_gateway_pii_findings", "PII values pseudonymized in requests or redacted in "
                            "answers, by entity type", "entity_type")
        self.feedback = _Counter("keel_gateway_feedback", "Feedback received, by rating (up, down, or score)",
                                 "rating")
        self.transitions = _Counter("keel_gateway_breaker_transitions", "Breaker state changes, by new state",
                                    "target", "to")
        self.breaker = _Gauge("keel_gateway_breaker_state", "0 closed, 1 half-open, 2 open", "target")
        self.in_flight = _Gauge("keel_gateway_in_flight", "Requests in flight on this replica")
        self.standing = _Gauge("keel_gateway_target_standing", "Share of automatic routing a target may get in "
                               "its evaluation standing: 1 serving, 0 excluded, between for a canary",
                               "target", "state")
        self.audit_failures = _Counter("keel_gateway_audit_failures", "Audit records that could not be written")
        self.feedback_links = _Counter("keel_gateway_feedback_link_failures",
                                       "Answers whose feedback link (or kept exchange) could not be written")
        self.traced = _Counter("keel_gateway_traces", "Request traces: exported, dropped or failed", "outcome")
        self._counters = [m for m in vars(self).values() if isinstance(m, _Counter)]
        for name, st in states.items():
            st.breaker.on_transition = partial(self.transitions.inc, name)
        self._stop = threading.Event()

    # -- the request path ----------------------------------------------------------------------------

    def finish(self, endpoint: str, status: int, seconds: float, outcome: Any, cost: float, actions: Actions) -> None:
        """A request is over. `outcome` None: refused before generation began (counted, no latency)."""
        self.requests.inc(endpoint, str(status))
        if actions.entities or actions.output_redacted or actions.toxicity_action or actions.output_error:
            self._guarded(actions)
        if outcome is None:
            return
        self.latency.observe(seconds, endpoint)
        if outcome.ttft_s is not None:
            self.ttft.observe(outcome.ttft_s)
        for f in outcome.failovers:
            self.failovers.inc(f["target"], f["error"])
        if (target := outcome.target) is not None:
            if status == 200:
                self.served.inc(target)
            usage = outcome.usage or {}
            self.tokens.inc(target, "input", by=usage.get("prompt_tokens", 0))
            self.tokens.inc(target, "output", by=usage.get("completion_tokens", 0))
            self.cost.inc(target, by=cost)

    def _guarded(self, a: Actions) -> None:
        for action, found in (("pseudonymized", a.entities), ("redacted", a.output_redacted)):
            if found:
                self.guard_actions.inc(action)
                for entity_type, n in found.items():
                    self.pii.inc(entity_type, by=n)
        if a.toxicity_action:  # flagged or blocked
            self.guard_actions.inc(a.toxicity_action)
        if a.output_error:  # the answer check failed: the rest of the answer was withheld
            self.guard_actions.inc("withheld")

    # -- events off the request path (writer threads, the trace exporter) ----------------------------

    def audit_failed(self) -> None:
        self.audit_failures.inc()

    def feedback_link_failed(self) -> None:
        self.feedback_links.inc()

    def feedback_received(self, rating: str) -> None:
        self.feedback.inc(rating)

    def traces(self, outcome: str, n: int) -> None:
        """`n` request traces exported, dropped or failed (the trace exporter's thread)."""
        self.traced.inc(outcome, by=n)

    # -- to Ray, every REFRESH_S ----------------------------------------------------------------------

    def start(self, in_flight: Callable[[], int], board: StandingBoard) -> None:
        """Send the counts and set the gauges every REFRESH_S in a daemon thread, until `close`."""
        threading.Thread(target=self._loop, args=(in_flight, board), name="keel-metrics", daemon=True).start()

    def flush(self) -> None:
        """The counts since the last flush, to Ray."""
        for counter in self._counters:
            counter.flush()

    def refresh(self, in_flight: int, board: StandingBoard) -> None:
        """The gauges, to Ray."""
        self.in_flight.set(in_flight)
        for name, st in self.states.items():
            self.breaker.set(BREAKER[st.breaker.status], name)
        for name, s in board.current.items():  # swapped whole by the board's thread: read without a lock
            self.standing.set(s.share, name, s.state)

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def _loop(self, in_flight: Callable[[], int], board: StandingBoard) -> None:
        while not self._stop.wait(REFRESH_S):
            self.flush()
            self.refresh(in_flight(), board)
