"""The gateway's metrics are the whole gateway's: two Ray Serve replicas record with ray.util.metrics, and one
scrape of Ray's metrics agent (the head's metrics port) shows both, without a tenant, a key, a request id or a
PII value in it. A fault server is the model; plain HTTP."""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest
import yaml

from keel.breaker import CircuitBreaker
from tests.support.faults import Fault
from tests.support.metrics import Scrape, scrape, wait_until
from tests.support.services import free_port, stop_serve, write_config

EMAIL = "maria.gonzalez@example.com"
REQUESTS = "ray_keel_gateway_requests_total"


@pytest.fixture(scope="module")
def gw(ray_driver, tmp_path_factory):
    from ray import serve

    from keel.keys import KeyStore
    from keel.settings import load_settings
    from serving.app import build

    root = tmp_path_factory.mktemp("metrics")
    model = Fault("model", root)
    cfg = write_config(root)
    doc = yaml.safe_load(cfg.read_text())
    port = free_port()
    doc["ports"]["gateway"] = port
    # One failure opens a replica's breaker, for long: the last test reads it open.
    doc["gateway"] = {"strategy": "latency", "replicas": 2, "breaker_failures": 1, "breaker_cooldown_s": 120}
    doc["policy"]["targets"] = [{"name": "model", "kind": "openai", "zone": "us", "price_per_1k_input": 0.1,
                                 "price_per_1k_output": 0.2, "tier": "small", "max_context": 4096,
                                 "options": {"base_url": model.url + "/v1"}}]
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    settings = load_settings(cfg)
    key, _ = KeyStore(settings).create("demo", "tests")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(settings), name="keel", route_prefix="/")
    # Before any request: the workers an earlier module's gateway left counters of.
    yield {"base": f"http://127.0.0.1:{port}", "key": key, "model": model, "metrics": ray_driver.metrics,
           "old": scrape(ray_driver.metrics).workers(), "rids": []}
    stop_serve()
    model.proc.stop()


def chat(gw, content: str, key: str | None = None, **headers: str) -> httpx.Response:
    r = httpx.post(gw["base"] + "/v1/chat/completions", timeout=60,
                   headers={**({"Authorization": f"Bearer {key}"} if key else {}), **headers},
                   json={"model": "model", "messages": [{"role": "user", "content": content}]})
    if "x-request-id" in r.headers:
        gw["rids"].append(r.headers["x-request-id"])
    return r


def served_by_replica(gw, sent: int) -> dict[str, int]:
    """Each replica's answers from its /healthz (a new connection each: either replica may take it)."""
    seen: dict[str, int] = {}
    for _ in range(100):
        h = httpx.get(gw["base"] + "/healthz").json()
        seen[h["replica"]] = h["targets"]["model"]["served"]
        if len(seen) == 2 and sum(seen.values()) == sent:
            break
    return seen


def test_one_scrape_shows_the_requests_of_both_replicas_and_no_tenant_key_or_request_id(gw):
    sent = 0
    while True:  # until both replicas have answered
        for _ in range(8):
            assert chat(gw, "Hello there", gw["key"]).status_code == 200
            sent += 1
        served = served_by_replica(gw, sent)
        if len(served) == 2 and all(served.values()):
            break
        assert sent < 200, served
    assert chat(gw, "hi", "keel-wrong").status_code == 401
    r = chat(gw, f"Mail {EMAIL} about it", gw["key"], **{"x-keel-data-class": "pii"})
    assert r.status_code == 200 and EMAIL in r.text
    rated = httpx.post(gw["base"] + "/v1/feedback", headers={"Authorization": f"Bearer {gw['key']}"},
                       json={"request_id": r.headers["x-request-id"], "rating": "up"})
    assert rated.status_code == 201, rated.text
    # A request id in a path: Serve's own series label the route's template (/v1/audit/{request_id}), never the path.
    httpx.get(f"{gw['base']}/v1/audit/{r.headers['x-request-id']}", headers={"Authorization": f"Bearer {gw['key']}"})

    def settled(p: Scrape) -> bool:  # every replica's last report in, gauges included
        return (p.total(REQUESTS, endpoint="chat", status="200") == sent + 1
                and p.total("ray_keel_gateway_feedback_total", rating="up") == 1
                and len(p.series("ray_keel_gateway_in_flight")) == 2)

    page = wait_until(gw["metrics"], settled, gw["old"])
    ok = page.series(REQUESTS, endpoint="chat", status="200")
    per_worker = Counter[str]()
    for s in ok:
        per_worker[s.labels["WorkerId"]] += int(s.value)
    assert len(per_worker) == 2  # one series per replica, Ray's WorkerId apart
    # The same split the replicas report themselves (one answer more on the one that took the PII request).
    assert sorted(per_worker.values()) in [sorted(a + b for a, b in zip(served.values(), d, strict=True))
                                           for d in ((0, 1), (1, 0))]
    assert {"NodeAddress", "SessionName", "WorkerId"} <= ok[0].labels.keys()
    assert page.total(REQUESTS, endpoint="chat", status="401") == 1
    assert page.total("ray_keel_gateway_request_seconds_count", endpoint="chat") == sent + 1  # not the 401
    assert page.total("ray_keel_gateway_ttft_seconds_count") == sent + 1
    assert page.total("ray_keel_gateway_target_served_total", target="model") == sent + 1
    tokens = {d: page.total("ray_keel_gateway_tokens_total", target="model", direction=d) for d in ("input", "output")}
    assert all(tokens.values())
    assert page.total("ray_keel_gateway_cost_total", target="model") == pytest.approx(
        (tokens["input"] * 0.1 + tokens["output"] * 0.2) / 1000)
    assert page.total("ray_keel_gateway_guard_actions_total", action="pseudonymized") == 1
    assert page.total("ray_keel_gateway_pii_findings_total", entity_type="EMAIL_ADDRESS") == 1
    # The gauges, per replica: set every second off the request path.
    assert [s.value for s in page.series("ray_keel_gateway_in_flight")] == [0, 0]
    assert [s.value for s in page.series("ray_keel_gateway_breaker_state", target="model")] == [0, 0]
    assert [s.value for s in page.series("ray_keel_gateway_target_standing", target="model", state="serving")] \
        == [1, 1]
    assert page.series("ray_serve_num_http_requests_total") or page.series("ray_serve_deployment_request_counter_total")
    # The address is unauthenticated: no tenant, key, request id or PII value, in any series of Ray's or Keel's.
    for secret in [*gw["rids"], gw["key"], EMAIL, "demo"]:
        assert secret not in page.text, secret


def test_the_gateway_has_no_metrics_path_of_its_own(gw):
    r = httpx.get(gw["base"] + "/metrics")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


def test_a_breakers_transitions_and_state_and_the_failover_are_counted(gw):
    gw["model"].control(mode="error")
    try:
        assert chat(gw, "fail", gw["key"]).status_code == 503  # its replica's breaker opens at the first failure
    finally:
        gw["model"].reset()
    page = wait_until(gw["metrics"], lambda p: 2 in [s.value for s in p.series("ray_keel_gateway_breaker_state")],
                      gw["old"])
    assert page.total("ray_keel_gateway_breaker_transitions_total", target="model", to="open") == 1
    assert page.total("ray_keel_gateway_failovers_total", target="model") == 1
    assert page.total(REQUESTS, endpoint="chat", status="503") == 1


def test_traces_counted_from_many_threads_at_once_are_all_counted(ray_driver):
    """Metrics.traces is called from the trace exporter's thread: here from eight at once, in a Ray actor, with
    the counts sent to Ray meanwhile."""
    import ray

    @ray.remote(num_cpus=0)
    class Exporter:
        def run(self) -> None:
            from serving.metrics import Metrics

            m = Metrics({})
            threads = [threading.Thread(target=lambda: [m.traces("dropped", 2) for _ in range(500)]) for _ in range(8)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                m.flush()
            m.close()  # the last counts

    before = scrape(ray_driver.metrics).total("ray_keel_gateway_traces_total", outcome="dropped")
    ray.get(Exporter.remote().run.remote())
    wait_until(ray_driver.metrics,
               lambda p: p.total("ray_keel_gateway_traces_total", outcome="dropped") == before + 8000)


def test_a_breaker_tells_each_transition_as_it_happens():
    clock = [0.0]
    told: list[str] = []
    b = CircuitBreaker(failures=1, cooldown_s=5, clock=lambda: clock[0], on_transition=told.append)
    b.failure()
    clock[0] = 6
    assert b.allow()
    b.success()
    assert told == ["open", "half_open", "closed"]


def test_the_request_path_imports_ray_only_when_a_metric_is_made():
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER and its auth mode once, at import: a test session that imported
    it while collecting (before the Ray head fixture sets them) looked for its cluster at the machine's address."""
    import subprocess
    import sys

    code = ("import sys, serving.metrics, serving.request.record, serving.request.trace, serving.usage\n"
            "assert 'ray' not in sys.modules, 'ray imported with the request path'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
