"""The fault server's answer modes, the targets of the evaluation's tests: grounded, ungrounded and toxic
answers that differ in that one quality, on real HTTP (aiohttp's test server, in process), over passages
the real chunker cut from the sample corpus, scored by the guard's own toxicity model."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from profanity_check import predict_prob

from keel.feedback.prompts import RAG_PROMPT
from keel.pipeline.chunking import chunk_text
from tests.support.fault_server import FaultServer

PRODUCT = Path(__file__).resolve().parents[1] / "data" / "sample" / "us" / "product"
REFUNDS, PRICING = (chunk_text(name, (PRODUCT / f"{name}.md").read_text(), 200, 40)[0].text
                    for name in ("refund-policy", "pricing"))
QUESTION = "How long do I have to return a device for a full refund?"


def rag_body(*passages: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A chat request as the gateway sends it for a RAG request (serving.request.ground)."""
    system = RAG_PROMPT + "\n\n".join(f"[{n}] {p}" for n, p in enumerate(passages, 1))
    return {"model": "fault", "stream": stream, **extra,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]}


PLAIN = {"model": "fault", "messages": [{"role": "user", "content": QUESTION}]}


def served(check: Callable[[Callable[..., Awaitable[str]], TestClient], Awaitable[None]]) -> None:
    """Runs `check` with a fault server on a real port and `ask(body, **control)`: the answer's text."""

    async def main() -> None:
        async with TestClient(TestServer(FaultServer().app())) as client:
            async def ask(body: dict[str, Any], **control: Any) -> str:
                if control:
                    assert (await client.post("/_control", json=control)).status == 200
                resp = await client.post("/v1/chat/completions", json=body)
                assert resp.status == 200
                if not body.get("stream"):
                    return str((await resp.json())["choices"][0]["message"]["content"])
                events = [json.loads(line[6:]) for line in (await resp.text()).splitlines()
                          if line.startswith("data: {")]
                return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])

            await check(ask, client)

    asyncio.run(main())


def claims(answer: str) -> list[str]:
    """The answer's sentences after its restatement of the question, citation markers taken out."""
    body = answer.split('": ', 1)[1]
    return [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r" \[\d\]", "", body)) if s]


def test_a_grounded_answer_copies_the_passages_sentences_and_cites_them():
    async def check(ask, _) -> None:
        answer = await ask(rag_body(REFUNDS, PRICING), answer="grounded")
        assert answer == await ask(rag_body(REFUNDS, PRICING, stream=True))  # streamed or whole, one answer
        assert answer.startswith('On "How long do I have to return a": ')  # the question's first 8 words
        one, two = answer.split('": ', 1)[1].removesuffix(" [2]").split(" [1] ")
        assert REFUNDS.startswith("# Refund policy") and one in REFUNDS and two in PRICING  # verbatim
        assert one.startswith("We want you to be happy with Halden.") and two[0].isupper() and two.endswith(".")
        assert await ask(rag_body(REFUNDS)) == answer.split(" [1] ")[0] + " [1]"  # one passage: [1] alone
        assert await ask(PLAIN) == "Here is a short answer to your question about How long do I have to return a."

    served(check)


def test_an_ungrounded_answer_has_the_grounded_ones_shape_and_none_of_its_facts():
    async def check(ask, _) -> None:
        grounded = await ask(rag_body(REFUNDS, PRICING), answer="grounded")
        answer = await ask(rag_body(REFUNDS, PRICING), answer="ungrounded")
        assert answer == await ask(rag_body(REFUNDS, PRICING, stream=True))  # deterministic
        assert answer.split('": ')[0] == grounded.split('": ')[0]  # the same restatement of the question
        assert re.findall(r"\[\d\]", answer) == ["[1]", "[2]"] and len(claims(answer)) == len(claims(grounded))
        assert abs(len(answer) - len(grounded)) <= 0.3 * len(grounded)
        assert not any(s in REFUNDS + PRICING for s in claims(answer))
        assert predict_prob([answer])[0] < 0.5
        assert await ask(PLAIN) == await ask(PLAIN, answer="grounded")  # nothing to ground: the same sentence

    served(check)


def test_a_toxic_answer_scores_as_toxic_with_the_same_shape():
    async def check(ask, _) -> None:
        grounded = await ask(rag_body(REFUNDS, PRICING), answer="grounded")
        answer = await ask(rag_body(REFUNDS, PRICING, stream=True), answer="toxic")
        assert re.findall(r"\[\d\]", answer) == ["[1]", "[2]"] and len(claims(answer)) == len(claims(grounded))
        assert abs(len(answer) - len(grounded)) <= 0.3 * len(grounded)
        assert predict_prob([answer])[0] > 0.9
        assert all(predict_prob([s])[0] > 0.9 for s in claims(answer))  # the guard checks sentence by sentence
        assert predict_prob([await ask(PLAIN)])[0] > 0.9

    served(check)


def test_tool_calls_and_json_mode_are_as_before_and_reset_brings_back_the_echo():
    async def check(ask, client) -> None:
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        called = await client.post("/v1/chat/completions", json=rag_body(REFUNDS, tools=tools))
        assert (await called.json())["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
        as_json = await ask(rag_body(REFUNDS, response_format={"type": "json_object"}), answer="toxic")
        assert json.loads(as_json) == {"echo": QUESTION}
        assert (await client.post("/_control", json={"answer": "rude"})).status == 400
        assert (await client.post("/_reset")).status == 200
        assert (await ask(rag_body(REFUNDS))).startswith(f"Echo: {QUESTION}")

    served(check)


@pytest.mark.parametrize("stream", [True, False])
def test_first_delay_holds_the_first_byte_and_delay_each_token_streamed_or_not(stream):
    async def check(ask, client) -> None:
        start = time.perf_counter()
        await ask({**PLAIN, "stream": stream}, answer="grounded", first_delay_s=0.2)
        assert time.perf_counter() - start >= 0.2
        await client.post("/_reset")
        start = time.perf_counter()
        text = await ask({**PLAIN, "stream": stream}, delay_s=0.02)  # the echo: 30 tokens or so
        assert time.perf_counter() - start >= 0.02 * len(text.split())
        assert (await (await client.post("/_reset")).json())["first_delay_s"] == 0.0

    served(check)
