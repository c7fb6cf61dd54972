"""POST /v1/feedback and the prompt variants on a real gateway: two Ray Serve replicas, a real MLflow
server holding the variants, a fault server as the model, plain HTTP.

What "nothing lost" means here: every accepted feedback is one row in the zone's store (an update from
the same key replaces it, never adds one), every refused one stores nothing and says why in OpenAI's
error shape, and no planted PII value reaches the store or the audit trail."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.faults import Fault
from tests.support.services import free_port, start_mlflow, stop_serve, write_config

PLANTED = ("Maria Gonzalez", "maria.gonzalez@example.com", "415-555-0123")


@pytest.fixture(scope="module")
def fb(ray_driver, tmp_path_factory):
    from ray import serve

    from keel.feedback import prompts
    from keel.keys import KeyStore
    from keel.settings import load_settings
    from serving.app import build

    root = tmp_path_factory.mktemp("feedback")
    mlflow, mlflow_url = start_mlflow(root / "mlflow")
    # Two variants of keel/auto's system prompt before the gateway starts: its first read has them.
    v1 = prompts.register(mlflow_url, "keel-auto", "Answer briefly.", "variant A")
    v2 = prompts.register(mlflow_url, "keel-auto", "Answer briefly and kindly.", "variant B")
    model = Fault("model", root)
    cfg = write_config(root, mlflow_tracking_uri=mlflow_url)
    doc = yaml.safe_load(cfg.read_text())
    port = free_port()
    doc["ports"]["gateway"] = port
    doc["gateway"] = {"strategy": "latency", "replicas": 2}
    doc["feedback"] = {"refresh_s": 1, "max_comment_chars": 500}
    doc["policy"]["targets"] = [{"name": "model", "kind": "openai", "zone": "us", "price_per_1k_input": 0.1,
                                 "price_per_1k_output": 0.2, "tier": "small", "max_context": 4096,
                                 "options": {"base_url": model.url + "/v1"}}]
    demo = doc["policy"]["tenants"][0]
    demo["retain_exchanges"] = ["pii"]  # kept: pii only; its internal default is not
    doc["policy"]["tenants"].append({"name": "other", "allowed_classes": ["public"], "default_class": "public"})
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    settings = load_settings(cfg)
    key, record = KeyStore(settings).create("demo", "tests")
    other_key, _ = KeyStore(settings).create("other", "tests")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(settings), name="keel", route_prefix="/")
    yield {"base": f"http://127.0.0.1:{port}", "key": key, "key_id": record.id, "other_key": other_key,
           "settings": settings, "versions": (v1, v2), "root": root}
    stop_serve()
    model.proc.stop()
    mlflow.stop()


def ask(fb, content: str, key: str | None = None, model: str = "model", **headers: str) -> httpx.Response:
    r = httpx.post(fb["base"] + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {key or fb['key']}", **headers},
                   json={"model": model, "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    return r


def feedback(fb, body: dict | bytes, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or fb['key']}"}
    if isinstance(body, bytes):
        return httpx.post(fb["base"] + "/v1/feedback", content=body, headers=headers, timeout=30)
    return httpx.post(fb["base"] + "/v1/feedback", json=body, headers=headers, timeout=30)


def store(fb, zone: str = "us"):
    from keel.feedback.store import open_zone

    return open_zone(fb["settings"], zone)


def test_feedback_is_stored_scrubbed_once_per_key_and_updated_by_a_second_post(fb):
    answer = ask(fb, "What is the refund policy?").json()
    rid, usage = answer["id"], answer["usage"]
    comment = f"Wrong for {PLANTED[0]}: write to {PLANTED[1]} or call {PLANTED[2]}."
    r = feedback(fb, {"request_id": rid, "rating": "down", "comment": comment})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["object"] == "feedback" and body["score"] == 0.0 and body["rating"] == "down"
    assert not [v for v in PLANTED if v in body["comment"]] and "[PERSON]" in body["comment"]

    r = feedback(fb, {"request_id": rid, "score": 0.75, "correction": f"Refunds within 30 days, {PLANTED[0]}."})
    assert r.status_code == 200, r.text  # the same key again: an update
    rows = [row for row in store(fb).feedback() if row["request_id"] == rid]
    assert len(rows) == 1
    row = rows[0]
    assert row["score"] == 0.75 and row["rating"] is None and row["comment"] is None
    assert row["correction"] == "Refunds within 30 days, [PERSON]." and row["target"] == "model"
    assert row["tenant"] == "demo" and row["data_class"] == "internal" and row["key_id"] == fb["key_id"]
    link = store(fb).link(rid, "demo")  # the request's usage and cost at the target's prices (0.1, 0.2 per 1k)
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0 and link is not None
    assert (link.prompt_tokens, link.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert link.cost == pytest.approx((usage["prompt_tokens"] * 0.1 + usage["completion_tokens"] * 0.2) / 1000)

    # The trail says feedback arrived, linked by the request id, and never holds its words.
    records = httpx.get(f"{fb['base']}/v1/audit/{rid}", headers={"Authorization": f"Bearer {fb['key']}"}).json()
    kinds = [r["kind"] for r in records["data"]]
    assert kinds.count("interaction") == 1 and kinds.count("feedback") == 2
    fed = [r for r in records["data"] if r["kind"] == "feedback"]
    assert fed[0]["comment"] is True and fed[1]["updated"] is True and fed[1]["correction"] is True
    trail = b"".join(p.read_bytes() for p in Path(fb["root"]).rglob("records-*.jsonl"))
    assert not [v for v in PLANTED if v.encode() in trail]


def test_feedback_is_scoped_to_the_keys_tenant(fb):
    rid = ask(fb, "Where is my parcel?").json()["id"]
    r = feedback(fb, {"request_id": rid, "rating": "up"}, key=fb["other_key"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"  # like a request that never was
    assert rid not in r.text
    assert feedback(fb, {"request_id": rid, "rating": "up"}).status_code == 201


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"rating": "up"}, 400, "request_id"),
    ({"request_id": "RID", "rating": "meh"}, 400, "rating"),
    ({"request_id": "RID", "score": 1.5}, 400, "score"),
    ({"request_id": "RID", "rating": "up", "score": 1}, 400, None),
    ({"request_id": "RID"}, 400, None),
    ({"request_id": "RID", "rating": "up", "stars": 5}, 400, "stars"),
    ({"request_id": "RID", "rating": "up", "comment": "x" * 501}, 400, "comment"),
    ({"request_id": "RID", "rating": "up", "comment": "x" * 20_000}, 400, None),
    ({"request_id": "no-such-request", "rating": "up"}, 404, "request_id"),
])
def test_bad_feedback_is_a_4xx_in_openais_shape_and_stores_nothing(fb, body, status, param):
    from tests.support.openai_schema import validate

    rid = ask(fb, "Is there a warranty?").json()["id"]
    before = store(fb).count("feedback")
    if isinstance(body, dict) and body.get("request_id") == "RID":
        body = {**body, "request_id": rid}
    r = feedback(fb, body)
    assert r.status_code == status, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param
    assert store(fb).count("feedback") == before
    assert httpx.post(fb["base"] + "/v1/feedback", json={"request_id": rid, "rating": "up"}).status_code == 401


def test_opted_in_exchanges_are_kept_pseudonymized_and_others_are_not(fb):
    ask_text = f"My name is {PLANTED[0]}, email {PLANTED[1]}. Can I get a refund?"
    kept = ask(fb, ask_text, **{"x-keel-data-class": "pii"}).json()["id"]
    not_kept = ask(fb, ask_text).json()["id"]  # internal: demo did not opt in
    assert feedback(fb, {"request_id": kept, "rating": "up"}).status_code == 201
    rows = {r["request_id"]: r for r in store(fb).rated_exchanges(time.time())}
    assert kept in rows and not_kept not in rows
    row = rows[kept]
    text = " ".join([*(m["content"] for m in row["messages"]), row["answer"]])
    assert "<PERSON_1>" in text and "<EMAIL_ADDRESS_1>" in row["answer"]  # as the model saw and wrote it
    assert not [v for v in PLANTED if v in text]
    assert row["expires_at"] == pytest.approx(row["created_at"] + 30 * 86400)


def test_the_bandit_moves_and_both_replicas_follow_one_posterior(fb):
    """Variant B of keel/auto gets every "up", A every "down"; after the boards' next refresh (1 s), both
    replicas report the same posteriors, and B takes most of the traffic."""
    v1, v2 = fb["versions"]
    seen: dict[int, int] = {v1: 0, v2: 0}
    for _ in range(40):
        r = ask(fb, "Hello there", model="keel/auto")
        prompt = r.json()["keel"]["prompt"]
        assert prompt["name"] == "keel-auto"
        seen[prompt["version"]] += 1
        verdict = "up" if prompt["version"] == v2 else "down"
        assert feedback(fb, {"request_id": r.json()["id"], "rating": verdict}).status_code == 201
    assert seen[v1] and seen[v2]  # both were tried before the evidence came in
    time.sleep(2.5)
    posteriors: dict[str, dict] = {}
    for _ in range(60):
        health = httpx.get(fb["base"] + "/healthz").json()
        posteriors[health["replica"]] = {v["version"]: (v["alpha"], v["beta"])
                                         for v in health["prompts"]["prompts"]["keel-auto"]}
        if len(posteriors) == 2:
            break
    assert len(posteriors) == 2, "the scrapes never reached the second replica"
    a, b = posteriors.values()
    assert a == b  # one posterior, whichever replica answers
    assert a[v2] == (1 + seen[v2], 1.0) and a[v1] == (1.0, 1 + seen[v1])
    later = [ask(fb, "Hello again", model="keel/auto").json()["keel"]["prompt"]["version"] for _ in range(30)]
    assert later.count(v2) >= 24, later


def test_a_caller_may_ask_for_a_variant_of_the_pool_by_its_id(fb):
    v1, _ = fb["versions"]
    for _ in range(3):
        r = ask(fb, "Hello", model="keel/auto", **{"x-keel-prompt": f"keel-auto@{v1}"})
        assert r.json()["keel"]["prompt"] == {"name": "keel-auto", "version": v1}
    r = httpx.post(fb["base"] + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {fb['key']}", "x-keel-prompt": "keel-auto@99"},
                   json={"model": "keel/auto", "messages": [{"role": "user", "content": "Hello"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-keel-prompt", r.text
