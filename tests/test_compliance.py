"""Compliance on the request path, end to end on a real Ray Serve: the PII guard, residency, tenants.

Three capture servers (tests.support.fault_server, real processes) stand in for external providers, one
in `us` and two in `eu`, and keep every byte they receive. Two gateways run side by side on the
same targets: `keel` (the guard on, as shipped) and `control` (the guard off): the positive control
that shows the captures DO see the values when nothing protects them, so the checks can fail.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import yaml

from tests.support.faults import Fault
from tests.support.services import free_port, stop_serve, write_config

NAME, EMAIL, SSN = "Maria Gonzalez", "maria.gonzalez@example.com", "536-22-8841"
CARD, MRN = "4111 1111 1111 1111", "4451234"
PHONE = "(212) 555-0199"
PROMPTS = [
    f"I am {NAME}; my SSN is {SSN}.",
    f"Charge card {CARD} and email {EMAIL}.",
    f"Patient {NAME}, medical record MRN {MRN}, call {PHONE}.",
]
VALUES = [NAME, EMAIL, SSN, CARD, MRN, PHONE]


def forms(value: str) -> set[str]:
    """The value as typed, digits only, and spaced or dashed differently: none may reach a target."""
    out = {value, json.dumps(value)[1:-1]}
    digits = re.sub(r"\D", "", value)
    if len(digits) >= 7:
        out |= {digits, " ".join(re.findall(r"\d{4}|\d+", digits)), "-".join(re.findall(r"\d{4}|\d+", digits))}
        out |= {re.sub(r"[\s-]", "", value), value.replace(" ", "-"), value.replace("-", " ")}
    return out


@pytest.fixture(scope="module")
def cx(ray_driver, tmp_path_factory):
    from ray import serve

    from keel.keys import KeyStore
    from keel.settings import load_settings
    from serving.app import build

    root = tmp_path_factory.mktemp("compliance")
    caps = {n: Fault(n, root) for n in ("us-cap", "eu-cap", "eu-cap2")}
    doc = yaml.safe_load(write_config(root).read_text())
    port = free_port()
    doc["ports"]["gateway"] = port
    doc["gateway"] = {"strategy": "cost", "breaker_failures": 2, "breaker_cooldown_s": 3.0,
                      "first_token_timeout_s": 3.0}
    doc["guard"] = {"toxicity": "block"}
    doc["policy"]["data_classes"]["pii"]["allowed_zones"] = ["eu"]  # pii is pinned to eu
    doc["pipeline"]["sources"] = []  # the sample's us pii source would break that residency rule
    price = {"us-cap": 0.1, "eu-cap": 0.2, "eu-cap2": 0.3}  # cost strategy: us-cap first wherever allowed
    doc["policy"]["targets"] = [
        {"name": n, "kind": "openai", "zone": n.split("-")[0], "price_per_1k_input": price[n],
         "price_per_1k_output": price[n],
         "tier": "small", "max_context": 4096, "options": {"base_url": f.url + "/v1"}}
        for n, f in caps.items()
    ]
    doc["policy"]["tenants"] = [
        {"name": "acme", "allowed_classes": ["public", "internal", "pii", "phi"], "default_class": "internal"},
        {"name": "basic", "allowed_classes": ["public", "internal"], "default_class": "internal",
         "allowed_zones": ["us"]},
        {"name": "metered", "allowed_classes": ["internal"], "default_class": "internal", "requests_per_minute": 3},
    ]
    cfg = root / "keel.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    settings = load_settings(cfg)
    control = settings.model_copy(update={"guard": settings.guard.model_copy(update={"enabled": False})})
    keys = {t: KeyStore(settings).create(t, "tests")[0] for t in ("acme", "basic", "metered")}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(settings), name="keel", route_prefix="/")
    serve.run(build(control), name="control", route_prefix="/control")
    yield {"base": f"http://127.0.0.1:{port}", "keys": keys, "caps": caps, "settings": settings}
    stop_serve()
    for f in caps.values():
        f.proc.stop()


@pytest.fixture
def caps(cx):
    """Every capture server healthy and empty, and the gateway's breakers closed again."""
    for f in cx["caps"].values():
        f.reset()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(t["breaker"] != "open" for t in httpx.get(cx["base"] + "/healthz").json()["targets"].values()):
            break
        time.sleep(0.5)
    return cx["caps"]


def client(cx, tenant: str = "acme", gateway: str = ""):
    from openai import OpenAI

    return OpenAI(base_url=f"{cx['base']}{gateway}/v1", api_key=cx["keys"][tenant], max_retries=0)


def post(cx, body: dict, tenant: str = "acme", **headers: str) -> httpx.Response:
    h = {"Authorization": f"Bearer {cx['keys'][tenant]}", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return httpx.post(f"{cx['base']}/v1/chat/completions", json=body, headers=h, timeout=30)


def streamed(stream) -> tuple[str, str | None, dict]:
    parts, finish, keel = [], None, {}
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        keel = (chunk.model_extra or {}).get("keel") or keel  # on the stream's last chunk
    return "".join(parts), finish, keel


# -- the PII guard ------------------------------------------------------------------------------


def test_capture_never_sees_a_value_and_the_caller_gets_them_back(cx, caps):
    c = client(cx)
    caps["us-cap"].control(chunk_chars=3)  # placeholders arrive split across stream chunks
    for ask in PROMPTS:
        r = c.chat.completions.create(model="us-cap", messages=[{"role": "user", "content": ask}])
        assert r.choices[0].message.content.startswith(f"Echo: {ask}.")  # the model echoed placeholders
        text, finish, keel = streamed(c.chat.completions.create(
            model="us-cap",
            messages=[{"role": "system", "content": f"The user is {NAME}."}, {"role": "user", "content": ask}],
            stream=True))
        assert text.startswith(f"Echo: {ask}.") and finish == "stop"
        assert keel["guard"]["pseudonymized"] and keel["data_class"] == "internal"
    done = c.completions.create(model="us-cap", prompt=PROMPTS[1])
    assert done.choices[0].text.startswith(f"Echo: {PROMPTS[1]}.")
    sent = caps["us-cap"].requests()
    assert len(sent) == 7 and "<PERSON_1>" in json.dumps(sent)
    raw = caps["us-cap"].raw().decode("utf-8", "replace")
    leaked = sorted(f for v in VALUES for f in forms(v) if f in raw)
    assert not leaked, f"the capture server saw {leaked}"


def test_positive_control_without_the_guard_the_capture_sees_every_value(cx, caps):
    c = client(cx, gateway="/control")
    for ask in PROMPTS:
        c.chat.completions.create(model="us-cap", messages=[{"role": "user", "content": ask}])
    raw = caps["us-cap"].raw().decode()
    assert all(v in raw for v in VALUES)


def test_new_identifiers_in_an_answer_are_redacted_and_toxicity_is_blocked(cx, caps):
    caps["us-cap"].control(append=" For help call 646-555-0143 or write to help.desk@othercorp.com.")
    r = client(cx).chat.completions.create(model="us-cap", messages=[{"role": "user", "content": f"I am {NAME}."}])
    text = r.choices[0].message.content
    assert NAME in text and "646-555-0143" not in text and "othercorp" not in text
    assert "[PHONE_NUMBER]" in text and "[EMAIL_ADDRESS]" in text
    assert r.model_extra["keel"]["guard"]["output_redacted"] == {"PHONE_NUMBER": 1, "EMAIL_ADDRESS": 1}
    caps["us-cap"].control(append=" You are a stupid idiot and I hate you.")
    blocked = client(cx).chat.completions.create(model="us-cap", messages=[{"role": "user", "content": "hello"}])
    assert blocked.choices[0].finish_reason == "content_filter"
    assert "idiot" not in (blocked.choices[0].message.content or "")
    text, finish, keel = streamed(client(cx).chat.completions.create(
        model="us-cap", messages=[{"role": "user", "content": "hello"}], stream=True))
    assert finish == "content_filter" and "idiot" not in text and keel["guard"]["toxicity_action"] == "blocked"


# -- residency ----------------------------------------------------------------------------------


def test_a_class_pinned_to_eu_never_reaches_us_and_fails_closed_when_eu_is_down(cx, caps):
    c = client(cx)
    r = c.chat.completions.with_raw_response.create(model="keel/auto",
                                                    messages=[{"role": "user", "content": "eu only"}],
                                                    extra_headers={"x-keel-data-class": "pii"})
    keel = r.parse().model_extra["keel"]
    assert keel["route"]["target"] == "eu-cap" and keel["zones"] == ["eu"]
    assert keel["route"]["excluded"]["us-cap"].startswith("residency")
    us = c.chat.completions.create(model="keel/auto", messages=[{"role": "user", "content": "us is fine"}],
                                   extra_headers={"x-keel-zone": "us"})
    assert us.model_extra["keel"]["route"]["target"] == "us-cap"  # the same config does reach us for internal data
    assert len(caps["us-cap"].requests()) == 1
    caps["us-cap"].reset()
    for f in ("eu-cap", "eu-cap2"):
        caps[f].control(mode="error")
    down = post(cx, {"model": "keel/auto", "messages": [{"role": "user", "content": "eu is down"}]},
                x_keel_data_class="pii")
    assert down.status_code == 503 and down.json()["error"]["code"] == "all_targets_failed"
    assert "zones ['eu']" in down.json()["error"]["message"] and "another zone" in down.json()["error"]["message"]
    post(cx, {"model": "keel/auto", "messages": [{"role": "user", "content": "again"}]}, x_keel_data_class="pii")
    closed = post(cx, {"model": "keel/auto", "messages": [{"role": "user", "content": "breakers open"}]},
                  x_keel_data_class="pii")
    assert closed.status_code == 503 and closed.json()["error"]["code"] == "no_healthy_target"
    assert "zones ['eu']" in closed.json()["error"]["message"] and closed.headers["retry-after"]
    assert caps["us-cap"].requests() == []  # never spilled into us
    named = post(cx, {"model": "us-cap", "messages": [{"role": "user", "content": "x"}]}, x_keel_data_class="pii")
    assert named.status_code == 403 and named.json()["error"]["code"] == "residency"
    assert caps["us-cap"].requests() == []


# -- tenants ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tenant", "headers", "status", "code"), [
    ("basic", {"x_keel_data_class": "pii"}, 403, "data_class_not_allowed"),   # not among the tenant's classes
    ("acme", {"x_keel_data_class": "public"}, 403, "data_class_not_allowed"),  # laxer than the key's default
    ("acme", {"x_keel_data_class": "secret"}, 400, "invalid_data_class"),
    ("basic", {"x_keel_zone": "eu"}, 403, "zone_not_allowed"),                # outside the tenant's zones
    ("acme", {"x_keel_data_class": "phi", "x_keel_zone": "eu"}, 403, "zone_not_allowed"),  # phi lives in us
])
def test_a_request_asking_for_more_than_its_tenant_may_is_refused(cx, caps, tenant, headers, status, code):
    r = post(cx, {"model": "keel/auto", "messages": [{"role": "user", "content": "hi"}]}, tenant, **headers)
    assert r.status_code == status and r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert all(f.requests() == [] for f in caps.values())


def test_stricter_class_is_allowed_and_routes_within_its_zones(cx, caps):
    r = post(cx, {"model": "keel/auto", "messages": [{"role": "user", "content": "hi"}]}, "acme",
             x_keel_data_class="phi")
    assert r.status_code == 200
    assert r.json()["keel"]["route"]["target"] == "us-cap" and r.json()["keel"]["data_class"] == "phi"


def test_per_tenant_rate_limit_answers_429_with_retry_after(cx, caps):
    body = {"model": "us-cap", "messages": [{"role": "user", "content": "hi"}]}
    assert [post(cx, body, "metered").status_code for _ in range(3)] == [200, 200, 200]
    r = post(cx, body, "metered")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 20
    assert post(cx, body, "acme").status_code == 200  # another tenant is not held back


# -- the audit trail ----------------------------------------------------------------------------


def test_audit_records_carry_class_zone_and_guard_counts_and_no_value_anywhere(cx, caps):
    from keel import audit

    r = post(cx, {"model": "keel/auto", "messages": [{"role": "user", "content": PROMPTS[0]}]}, x_keel_data_class="pii")
    rid = r.headers["x-request-id"]
    time.sleep(0.2)
    rec = httpx.get(f"{cx['base']}/v1/audit/{rid}",
                    headers={"Authorization": f"Bearer {cx['keys']['acme']}"}).json()["data"][0]
    assert (rec["data_class"], rec["zone"], rec["target"]) == ("pii", "eu", "eu-cap")
    assert rec["guard"]["pseudonymized"] and rec["guard"]["pii_entities"].get("PERSON") == 1
    s = cx["settings"]
    trails = audit.Trails(s, "reader")
    trails.close()
    roots = trails.roots()
    assert audit.find(roots["eu"], rid) and not audit.find(roots["us"], rid)  # the record stays in the request's zone
    key = s.audit_keys()
    kinds = set()
    for zone, root in roots.items():
        assert audit.verify(root, key).ok
        text = "".join(p.read_text() for p in root.rglob("*") if p.is_file())
        assert not [v for v in VALUES if v in text], f"raw PII in the {zone} audit trail"
        kinds |= {r["kind"] for r in audit.records(root)}
    assert {"config", "interaction"} <= kinds
