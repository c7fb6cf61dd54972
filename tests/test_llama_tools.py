"""Tool calling on the default stack: the example config's llama.cpp target (SmolLM2-135M in a real Ray
Serve replica) answers a tools request to keel/auto with OpenAI tool calls whose arguments a grammar
built from the function's JSON schema keeps valid (issue 15). The gateway runs with the example's
timeouts: a tools prompt is ~250 tokens, which a shared CPU may take longer than test_gateway's 3 s to read."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest
import yaml

from tests.support.services import free_port, stop_serve, write_config

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET", "JST"]}}, "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def gw(ray_driver, tmp_path_factory):
    from ray import serve

    from keel.keys import KeyStore
    from keel.settings import load_settings
    from serving.app import build

    root = tmp_path_factory.mktemp("llama-tools")
    cfg = write_config(root)
    doc = yaml.safe_load(cfg.read_text())
    port = doc["ports"]["gateway"] = free_port()
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    settings = load_settings(cfg)
    key, _ = KeyStore(settings).create("demo", "tests")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(settings), name="keel", route_prefix="/")
    yield {"base": f"http://127.0.0.1:{port}", "key": key}
    stop_serve()


def post(gw, body, **headers):
    return httpx.post(gw["base"] + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {gw['key']}", **headers})


def events(gw, body):
    with httpx.stream("POST", gw["base"] + "/v1/chat/completions", json={**body, "stream": True}, timeout=120,
                      headers={"Authorization": f"Bearer {gw['key']}"}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_a_tools_request_to_keel_auto_is_answered_with_tool_calls_streaming_and_not(gw):
    from tests.support.openai_schema import validate

    body = {"model": "keel/auto", "messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 48}
    r = post(gw, body)
    assert r.status_code == 200, r.text
    answer = r.json()
    validate(answer, "CreateChatCompletionResponse")
    (choice,) = answer["choices"]
    (call,) = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and answer["keel"]["route"]["target"] == "smollm2-135m-cpu"
    assert call["id"].startswith("call_") and call["type"] == "function" and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert answer["usage"]["completion_tokens"] > 0

    chunks = events(gw, body)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    deltas = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or ()]
    head, *rest = deltas
    assert head["id"].startswith("call_") and head["function"]["name"] == "get_weather"
    assert rest and all(d["index"] == 0 and "id" not in d and "name" not in d["function"] for d in rest)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_tool_choice_none_and_a_tool_result_in_the_history_are_answered_in_text(gw):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21, "sky": "clear"}'}]
    for messages in (ASK, history):
        r = post(gw, {"model": "keel/auto", "messages": messages, "tools": [WEATHER], "tool_choice": "none",
                      "temperature": 0, "max_tokens": 24})
        message = r.json()["choices"][0]["message"]
        assert r.status_code == 200 and message["content"].strip() and "tool_calls" not in message, r.text


def test_a_named_tool_choice_is_honoured_and_one_not_offered_is_refused(gw):
    body = {"model": "keel/auto", "messages": ASK, "tools": [WEATHER, CLOCK], "temperature": 0, "max_tokens": 48}
    r = post(gw, {**body, "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"])["tz"] in ("UTC", "CET", "JST")  # the enum, by the grammar
    r = post(gw, {**body, "tool_choice": {"type": "function", "function": {"name": "launch"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


# -- the replica alone ----------------------------------------------------------------------------


def test_history_with_tool_calls_and_results_renders_for_a_template_that_knows_neither():
    from serving.targets.llama_cpp import _turns

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    turns = _turns([{"role": "system", "content": "Be brief."}, *ASK,
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                    {"role": "tool", "tool_call_id": "call_2", "content": "wind"}], [WEATHER["function"]])
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0]["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in turns[0]["content"]
    assert turns[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert turns[3]["content"] == "<tool_response>\nrain\n</tool_response>\n<tool_response>\nwind\n</tool_response>"


def test_a_schema_llama_cpp_cannot_parse_falls_back_to_json_instead_of_crashing_the_replica(monkeypatch):
    """llama.cpp segfaults on a grammar it cannot parse; the replica checks each one first."""
    import serving.targets.llama_cpp as llama
    from serving.targets.llama_cpp import LlamaCppModel, model_path

    model = LlamaCppModel.func_or_class(model_path({}), 1024, 2, 1.1)
    monkeypatch.setattr(llama, "_arguments_gbnf", lambda parameters: "root ::= (")  # what a bad converter might give
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "temperature": 0, "max_tokens": 32}

    async def parts(b):
        return [p async for p in model.stream("chat", b)]

    *_, last = asyncio.run(parts(body))
    assert last["finish_reason"] in ("tool_calls", "length")
    (refused,) = asyncio.run(parts({**body, "tools": [{"type": "function", "function": {"name": "get weather"}}]}))
    assert refused["error"]["param"] == "tools" and refused["error"]["status"] == 400
