"""Evaluation drives routing, on a real Ray Serve gateway (two replicas) and a real MLflow server.

Four fault-server targets: `good-a` and `good-b` (healthy, zone us), `flaky` (the only one in zone
eu, degraded and recovered here), and `new` (a canary). Evaluations are Keel's own
(keel.evaluation.evaluate: the golden safety items through the gateway, scored, logged to MLflow),
run in this process; each replica reads the verdicts from MLflow on its own interval.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
import yaml

from tests.support.faults import Fault
from tests.support.services import free_port, start_mlflow, write_config

pytestmark = pytest.mark.slow

REFRESH_S = 1.0
FAULTS = ("good-a", "good-b", "flaky", "new")


@pytest.fixture(scope="module")
def gw(ray_driver, tmp_path_factory):
    from ray import serve

    from keel.evaluation.scorers import Models, keel_scorers
    from keel.keys import KeyStore
    from keel.retrieval import Retriever
    from keel.settings import load_settings
    from serving.app import build

    root = tmp_path_factory.mktemp("quality")
    server, mlflow_url = start_mlflow(root / "mlflow")
    faults = {name: Fault(name, root) for name in FAULTS}
    cfg = write_config(root)
    doc = yaml.safe_load(cfg.read_text())
    port = free_port()
    doc["ports"]["gateway"] = port
    doc["pipeline"]["mlflow_tracking_uri"] = mlflow_url
    doc["gateway"] = {"strategy": "latency", "replicas": 2, "breaker_failures": 3, "breaker_cooldown_s": 2.0}
    doc["evaluation"] = {"standing_refresh_s": REFRESH_S, "canary_share": 0.5, "canary_step": 0.5}
    base = {"kind": "openai", "price_per_1k_input": 0.1, "price_per_1k_output": 0.2, "tier": "small",
            "max_context": 4096}
    doc["policy"]["targets"] = [
        {"name": name, **base, "zone": "eu" if name == "flaky" else "us", "canary": name == "new",
         "options": {"base_url": f.url + "/v1"}} for name, f in faults.items()]
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    settings = load_settings(cfg)
    key, _ = KeyStore(settings).create("demo", "tests")
    eval_key, _ = KeyStore(settings).create("keel-eval", "tests")
    models = Models(settings)
    models.warm()
    scorers = keel_scorers(models, Retriever(settings))
    for f in faults.values():
        f.control(answer="grounded")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(settings), name="keel", route_prefix="/")
    yield {"base": f"http://127.0.0.1:{port}", "key": key, "eval_key": eval_key, "settings": settings,
           "mlflow": mlflow_url, "faults": faults, "scorers": scorers, "runs": 0}
    serve.delete("keel")
    for f in faults.values():
        f.proc.stop()
    server.stop()


def evaluate(gw, target: str) -> bool:
    """One evaluation of `target` (3 safety items), as the keel_evaluate DAG's job runs it; did it pass?"""
    from keel.evaluation.client import GatewayClient
    from keel.evaluation.evaluate import Plan
    from keel.evaluation.evaluate import evaluate as run

    gw["runs"] += 1
    client = GatewayClient(gw["settings"], gw["base"] + "/v1", gw["eval_key"])
    plan = Plan(target, ["safety"], 3, {"airflow_dag_id": "test", "airflow_run_id": f"r{gw['runs']}"})
    try:
        return run(gw["settings"], plan, gw["mlflow"], client, gw["scorers"]).passed
    finally:
        client.close()


def standing_everywhere(gw, target: str, state: str, timeout: float = 30) -> None:
    """Wait until both replicas report `target` in `state` (each refreshes on its own interval)."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(gw["base"] + "/healthz").json()
        seen[h["replica"]] = h["standing"]["targets"][target]["state"]
        if len(seen) == 2 and set(seen.values()) == {state}:
            return
        time.sleep(0.2)
    raise AssertionError(f"{target} not {state} on both replicas: {seen}")


def route(gw, n: int, zone: str | None = None) -> tuple[Counter[str], list[str]]:
    """n automatic requests: how many each target answered, and their x-keel-route headers."""
    headers = {"Authorization": f"Bearer {gw['key']}", **({"x-keel-zone": zone} if zone else {})}
    served: Counter[str] = Counter()
    routes = []
    with httpx.Client(timeout=30) as http:
        for i in range(n):
            r = http.post(gw["base"] + "/v1/chat/completions", headers=headers,
                          json={"model": "keel/auto", "messages": [{"role": "user", "content": f"Hello {i}"}],
                                "max_tokens": 16})
            assert r.status_code == 200, r.text
            served[r.json()["keel"]["route"]["target"]] += 1
            routes.append(r.headers["x-keel-route"])
    gw["last_request_id"] = r.headers["x-request-id"]
    return served, routes


def audit_route(gw, request_id: str) -> dict:
    """The route the audit record of a request holds (records are written a moment after the answer)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.get(f"{gw['base']}/v1/audit/{request_id}", headers={"Authorization": f"Bearer {gw['key']}"})
        if r.status_code == 200:
            return next(rec["route"] for rec in r.json()["data"] if "route" in rec)
        time.sleep(0.5)
    raise AssertionError(f"no audit record for {request_id}")


def test_a_regressed_target_leaves_automatic_routing_and_returns_when_it_passes(gw):
    from keel.orchestration.evaluate import routing_consequence

    flaky = gw["faults"]["flaky"]
    assert evaluate(gw, "flaky")  # its baseline
    standing_everywhere(gw, "flaky", "serving")
    served, _ = route(gw, 30, zone="eu")
    assert served == {"flaky": 30}

    flaky.control(answer="toxic")
    assert not evaluate(gw, "flaky")
    standing_everywhere(gw, "flaky", "excluded")
    served, routes = route(gw, 40)
    assert served["flaky"] == 0 and served["good-a"] + served["good-b"] == 40, served
    assert all("flaky:quality" in r for r in routes), routes[0]
    assert audit_route(gw, gw["last_request_id"])["excluded"]["flaky"].startswith("quality: regressed in run")
    health = httpx.get(gw["base"] + "/healthz").json()["standing"]["targets"]["flaky"]
    assert health["share"] == 0 and "toxic_rate" in health["reason"]

    # Called by name it still answers; and where it is the last eligible target (the only one in zone
    # eu), it keeps serving, says why, and so does the alert.
    r = httpx.post(gw["base"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {gw['key']}"},
                   json={"model": "flaky", "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
    assert r.status_code == 200 and r.json()["keel"]["route"]["target"] == "flaky"
    served, routes = route(gw, 10, zone="eu")
    assert served == {"flaky": 10} and "fail-safe" in routes[0], routes[0]
    alert = routing_consequence(gw["settings"], "flaky")
    assert "keeps serving" in alert and "zone eu" in alert, alert

    flaky.control(answer="grounded")
    assert evaluate(gw, "flaky")
    standing_everywhere(gw, "flaky", "serving")
    _, routes = route(gw, 10)
    assert not any("flaky:" in r for r in routes), routes[0]
    served, routes = route(gw, 5, zone="eu")
    assert served == {"flaky": 5} and "fail-safe" not in routes[0]  # an ordinary target again


def test_a_canary_enters_on_its_first_pass_grows_and_drops_out_on_a_regression(gw):
    new = gw["faults"]["new"]
    standing_everywhere(gw, "new", "excluded")  # no evaluation yet: it waits
    served, _ = route(gw, 20)
    assert served["new"] == 0

    assert evaluate(gw, "new")
    standing_everywhere(gw, "new", "canary")
    served, routes = route(gw, 60)
    assert 15 <= served["new"] <= 45, served  # its share, 50% (binomial: 30 +- 4)
    assert any("canary new drawn" in r for r in routes) and any("new:canary" in r for r in routes)

    assert evaluate(gw, "new")  # a second pass: 0.5 + 0.5, all of its traffic
    standing_everywhere(gw, "new", "serving")
    _, routes = route(gw, 10)
    assert not any("new:" in r for r in routes)

    new.control(answer="toxic")
    assert not evaluate(gw, "new")
    standing_everywhere(gw, "new", "excluded")
    served, _ = route(gw, 30)
    assert served["new"] == 0, served
