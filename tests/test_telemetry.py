"""Telemetry on a real gateway: two Ray Serve replicas, a real MLflow server taking the traces over OTLP,
fault servers as the models, plain HTTP.

A request's trace is found in MLflow by its request id, with a span per stage and per target attempt
(a failover shows both), and holds no text: none of the planted values, none of the prompt's words. The
server-timing header splits the gateway's time from the model's. The usage endpoint shows only the key's
own tenant."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import yaml

from tests.support.faults import Fault
from tests.support.services import free_port, start_mlflow, stop_serve, write_config

PLANTED = ("Maria Gonzalez", "maria.gonzalez@example.com", "415-555-0123")
STAGES = ("authenticate", "parse", "scope", "admit", "prompt", "ground", "route", "protect", "generate", "check",
          "answer", "record")


@pytest.fixture(scope="module")
def tel(ray_driver, tmp_path_factory):
    from ray import serve

    from keel.keys import KeyStore
    from keel.settings import load_settings
    from serving.app import build

    root = tmp_path_factory.mktemp("telemetry")
    mlflow, mlflow_url = start_mlflow(root / "mlflow")
    primary, backup = Fault("primary", root), Fault("backup", root)
    cfg = write_config(root, mlflow_tracking_uri=mlflow_url)
    doc = yaml.safe_load(cfg.read_text())
    port = free_port()
    doc["ports"]["gateway"] = port
    doc["gateway"] = {"strategy": "latency", "replicas": 2}
    fault = {"kind": "openai", "zone": "us", "price_per_1k_input": 0.5, "price_per_1k_output": 1.5, "tier": "small",
             "max_context": 4096}
    doc["policy"]["targets"] = [{"name": "primary", **fault, "options": {"base_url": primary.url + "/v1"}},
                                {"name": "backup", **fault, "options": {"base_url": backup.url + "/v1"}}]
    doc["policy"]["tenants"].append({"name": "other", "allowed_classes": ["public"], "default_class": "public"})
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    settings = load_settings(cfg)
    key, _ = KeyStore(settings).create("demo", "tests")
    other_key, _ = KeyStore(settings).create("other", "tests")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(settings), name="keel", route_prefix="/")
    yield {"base": f"http://127.0.0.1:{port}", "key": key, "other_key": other_key, "settings": settings,
           "mlflow": mlflow_url, "primary": primary, "backup": backup}
    stop_serve()
    for f in (primary, backup):
        f.proc.stop()
    mlflow.stop()


@pytest.fixture
def faults(tel):
    for f in (tel["primary"], tel["backup"]):
        f.reset()
    yield tel["primary"], tel["backup"]
    for f in (tel["primary"], tel["backup"]):
        f.reset()


def ask(tel, content: str, key: str | None = None, stream: bool = False, **headers: str) -> httpx.Response:
    return httpx.post(tel["base"] + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key or tel['key']}", **headers},
                      json={"model": "primary", "stream": stream, "messages": [{"role": "user", "content": content}]})


def trace_of(tel, rid: str, timeout_s: float = 30):
    """The request's trace, once the replica's exporter has sent it (it batches for up to a second)."""
    import mlflow

    mlflow.set_tracking_uri(tel["mlflow"])
    experiment = mlflow.get_experiment_by_name("keel-traces")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if experiment is not None:
            found = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list",
                                         filter_string=f"tag.`keel.request_id` = '{rid}'")
            if found:
                return found[0]
        time.sleep(0.5)
        experiment = experiment or mlflow.get_experiment_by_name("keel-traces")
    raise AssertionError(f"no trace of request {rid} in MLflow after {timeout_s} s")


def spans(trace) -> dict[str, object]:
    return {s.name: s for s in trace.data.spans}


def test_a_requests_trace_is_found_by_its_request_id_with_a_span_per_stage_and_no_text(tel, faults):
    content = f"Summarize the zebrafish quarantine rules for {PLANTED[0]}, {PLANTED[1]}, {PLANTED[2]}."
    r = ask(tel, content, x_keel_data_class="pii")
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    trace = trace_of(tel, rid)
    by_name = spans(trace)
    assert set(STAGES) <= set(by_name), sorted(by_name)
    assert "attempt primary" in by_name and trace.info.tags["keel.request_id"] == rid
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.attributes["keel.route.strategy"] == "pinned" and root.attributes["keel.target"] == "primary"
    assert root.attributes["keel.status"] == 200 and root.attributes["keel.tenant"] == "demo"
    assert root.attributes["keel.guard.pseudonymized"] is True
    # Every span sits inside the root, and the stages follow one another.
    starts = [by_name[s].start_time_ns for s in STAGES if s != "answer"]
    assert starts == sorted(starts)
    assert all(root.start_time_ns <= s.start_time_ns <= s.end_time_ns <= root.end_time_ns + 1_000_000
               for s in trace.data.spans)
    # Usage and cost in MLflow's own terms: the trace's token usage is summed by MLflow.
    usage = json.loads(trace.info.trace_metadata["mlflow.trace.tokenUsage"])
    assert usage["input_tokens"] == r.json()["usage"]["prompt_tokens"]
    # No text: not a planted value nor a word of the prompt (which the echo model's answer repeats) anywhere.
    whole = trace.to_json()
    assert not [v for v in PLANTED if v in whole]
    assert not [w for w in ("Summarize", "zebrafish", "quarantine", "rules") if w in whole]


def test_a_failover_mid_stream_shows_both_attempts(tel, faults):
    primary, _ = faults
    primary.control(mode="cut", after_tokens=5)
    r = ask(tel, "tell me about failover", stream=True)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    trace = trace_of(tel, rid)
    by_name = spans(trace)
    first, second = by_name["attempt primary"], by_name["attempt backup"]
    assert first.status.status_code == "ERROR" and first.status.description == "cut"
    assert second.status.status_code == "OK" and first.end_time_ns <= second.start_time_ns
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.attributes["keel.failovers"] == 1 and root.attributes["keel.target"] == "backup"


def test_a_refused_request_has_its_trace_with_the_error(tel, faults):
    r = httpx.post(tel["base"] + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {tel['key']}"},
                   json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    trace = trace_of(tel, r.headers["x-request-id"])
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.status.status_code == "ERROR" and root.attributes["keel.status"] == 404
    assert "attempt primary" not in spans(trace)
    assert "authenticate" in timing(r.headers["server-timing"])  # a refusal says its timing too


def test_a_whole_answer_failing_after_its_model_began_keeps_its_route_and_timing_headers(tel, faults):
    for f in faults:
        f.control(mode="cut", after_tokens=3)
    r = ask(tel, "a few words, then nothing")
    assert r.status_code >= 500 and r.json()["error"]["code"], r.text
    t = timing(r.headers["server-timing"])
    assert {"generate", "keel", "model"} <= set(t)
    assert r.headers["x-keel-route"].startswith("target=none; strategy=pinned")  # no target answered


def timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, *params = part.strip().split(";")
        out[name] = next(float(p[4:]) for p in params if p.startswith("dur="))
    return out


def test_server_timing_splits_the_gateways_time_from_the_models(tel, faults):
    primary, _ = faults
    primary.control(first_delay_s=0.2)
    r = ask(tel, "how long does this take?")
    t = timing(r.headers["server-timing"])
    assert {"keel", "model", "authenticate", "route", "generate"} <= set(t)
    assert t["model"] >= 200 and t["keel"] < t["model"]
    keel = r.json()["keel"]
    assert keel["model_ms"] == pytest.approx(t["model"], abs=0.1)
    assert {"authenticate", "generate", "record"} <= set(keel["stages_ms"])

    # A stream's header goes with its first byte: the stages before it, and the model's time to a first token.
    r = ask(tel, "and streamed?", stream=True)
    t = timing(r.headers["server-timing"])
    assert "generate" in t and "record" not in t and t["model"] >= 200
    final = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")][-1]["keel"]
    assert "record" in final["stages_ms"] and final["model_ms"] >= t["model"]


def test_usage_shows_the_keys_own_tenant_only(tel, faults):
    start = int(time.time()) - 60
    for _ in range(2):
        assert ask(tel, "count me").status_code == 200
    r = httpx.post(tel["base"] + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {tel['other_key']}"},
                   json={"model": "primary", "messages": [{"role": "user", "content": "and me"}]})
    assert r.status_code == 200
    other_tokens = r.json()["usage"]["prompt_tokens"]
    deadline = time.monotonic() + 10  # links are written by each replica's store thread
    while True:
        page = httpx.get(tel["base"] + "/v1/usage", params={"start_time": start, "bucket_width": "1h"},
                         headers={"Authorization": f"Bearer {tel['other_key']}"}).json()
        results = [x for b in page["data"] for x in b["results"]]
        if results or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert page["object"] == "page" and page["keel"]["tenant"] == "other"
    assert sum(x["num_model_requests"] for x in results) == 1
    assert sum(x["input_tokens"] for x in results) == other_tokens
    assert {x["model"] for x in results} == {"primary"} and results[0]["amount"]["currency"] == "usd"
    assert results[0]["amount"]["value"] > 0

    mine = httpx.get(tel["base"] + "/v1/usage", params={"start_time": start, "bucket_width": "1h"},
                     headers={"Authorization": f"Bearer {tel['key']}"}).json()
    assert sum(x["num_model_requests"] for b in mine["data"] for x in b["results"]) >= 2

    default = httpx.get(tel["base"] + "/v1/usage", headers={"Authorization": f"Bearer {tel['key']}"})
    assert default.status_code == 200, default.text  # no parameters: the last 31 days, a bucket each
    assert len(default.json()["data"]) == 31
    assert sum(x["num_model_requests"] for b in default.json()["data"] for x in b["results"]) >= 2

    assert httpx.get(tel["base"] + "/v1/usage").status_code == 401
    bad = httpx.get(tel["base"] + "/v1/usage", params={"bucket_width": "2w"},
                    headers={"Authorization": f"Bearer {tel['key']}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "bucket_width"
