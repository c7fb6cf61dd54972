"""A small OpenAI-compatible server that can be told to fail: for failover tests and benchmarks.

    python -m tests.support.fault_server --port 9100 [--mode ok] [--delay-s 0.0] [--answer echo]

It answers /v1/chat/completions and /v1/completions (streaming and not) with a deterministic
answer: "Echo: <the last user message>." plus a fixed sentence (for chat, or another `answer`: below).
Asked to continue a cut answer (the partial answer as the assistant's turn), it goes on from where the
partial answer stops.
Every request is recorded: as a capture server standing in for an external provider, it keeps every
byte it received (request line, headers, body). Control it over HTTP:

    POST /_control {"mode": "ok|error|rate_limit|stall|cut", "after_tokens": 5, "delay_s": 0.01,
                    "first_delay_s": 0.0, "overlap_chars": 0, "append": "", "chunk_chars": 0,
                    "answer": "echo|grounded|ungrounded|toxic", "finish": "chunk|usage|done",
                    "drop_requests": 0}
    GET  /_requests    every request body received, oldest first
    GET  /_raw         every byte received on the model endpoints, as one octet stream
    POST /_reset       forget requests, back to mode ok, answer echo, no first delay

mode: error -> 500; rate_limit -> 429 with Retry-After; stall -> `after_tokens` tokens, then
silence; cut -> `after_tokens` tokens, then the connection is dropped. overlap_chars makes a
continuation first repeat that many characters of the partial answer (as real models do). append
adds a fixed text to every answer (a model volunteering something it was not asked); chunk_chars > 0
streams pieces of that many characters instead of words (so a word can arrive split). delay_s is
the pause before each token (a whole answer waits for all of them at once); first_delay_s, one pause
before the first byte of any answer (time to first token). finish: where a stream's finish_reason goes:
a chunk of its own (chunk), the chunk that carries the usage (usage), or nowhere, the stream ending with
`data: [DONE]` alone (done), as several real servers and proxies do. drop_requests: that many next requests
are read and their connection closed with no answer, as a pooled keep-alive connection to a server that
restarted fails.

answer (chat, not JSON mode or tool calls): targets for the evaluation's tests, each differing from
`grounded` in one quality only, so that an evaluation tells them apart on that quality alone.
- grounded: from the passages the gateway put in its system message (RAG, serving.request.ground):
  the question restated, the first full sentence or two of passage [1] copied verbatim, " [1]", then
  the first sentence of [2] and " [2]"; without passages, one polite sentence restating the question.
- ungrounded: the same shape (restatement, sentences of about the same lengths, markers), but with
  invented claims about a smart-home company that are in none of the passages.
- toxic: the same shape, in profanity and insults (common ones, no slurs).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import time
from typing import Any

from aiohttp import web

TAIL = ("Keel routes each request to a healthy model target and fails over without the caller "
        "noticing, even in the middle of a streamed answer.")
CONTINUE_MARK = "was cut off"
ANSWERS = ("echo", "grounded", "ungrounded", "toxic")


def answer_for(kind: str, body: dict[str, Any], answer: str = "echo") -> tuple[str, str]:
    """(full answer, the part already given) for a request; the second is empty unless continuing."""
    if kind == "completion":
        return f"Echo: {body.get('prompt', '')[:200]}. {TAIL}", ""
    msgs = body.get("messages") or []
    given = ""
    if len(msgs) >= 2 and msgs[-2].get("role") == "assistant" and CONTINUE_MARK in str(msgs[-1].get("content")):
        given, msgs = str(msgs[-2].get("content") or ""), msgs[:-2]
    elif msgs and msgs[-1].get("role") == "assistant":  # prefill-style continuation
        given, msgs = str(msgs[-1].get("content") or ""), msgs[:-1]
    users = [m for m in msgs if m.get("role") == "user"]
    ask = _text(users[-1].get("content")) if users else ""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return json.dumps({"echo": ask[:200]}), given
    if answer != "echo":
        return styled_answer(answer, ask, passages(msgs)), given
    return f"Echo: {ask[:200]}. {TAIL}", given


def _text(content: Any) -> str:
    return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content or [])


# -- answer modes ---------------------------------------------------------------------------------

# Claims about a smart-home company that no document states (the sample corpus's facts differ), and
# clauses that lengthen one to the length of the grounded sentence it stands for. No names, no numbers
# that look like identifiers.
INVENTED = (
    "Support answers by fax only",
    "All sensors run on solar power",
    "Refunds arrive as store credit only",
    "Every plan includes a free indoor drone",
    "Returns are not accepted after the first week",
    "The hub needs a new battery every single month",
    "The company stopped selling its first hub in 2016 after a recall in three countries",
    "Returns are accepted for up to 90 days, but only for devices still sealed in their box",
    "Refunds are paid out as store credit within two days and never go back to the original card",
    "Every hub runs on a sealed battery that lasts about six years and cannot be replaced at home",
    "Firmware updates are installed by hand from a memory card that ships with every starter kit",
    "Support is available by fax on weekdays from nine to eleven in the morning",
    "The company began as a maker of greenhouse heaters before it built its first thermostat",
    "Every camera stores its recordings on a private satellite network instead of the home network",
    "Annual plans cost 340 USD and include a technician visit to the customer's home every quarter",
    "Voice control works only with a dedicated remote that is paired over a landline phone",
    "Energy reports are printed and mailed to every customer twice a year",
    "Sensors must be recalibrated by a certified installer after every power cut",
    "Family sharing is limited to two people, who must both live at the same postal address",
    "The developer API accepts requests over FTP only and allows ten calls per day per account",
    "Leak sensors detect smoke as well as water and call the local fire brigade on their own",
    "Devices bought second-hand come with a lifetime warranty that covers accidental damage",
    "New accounts are verified by a letter that takes about three weeks to arrive",
    "The mobile app can be used for one hour a day unless the customer pays for a premium plan",
)
INVENTED_CLAUSES = (
    ", according to the company's most recent annual report",
    ", a rule that has been in place since the first product launch",
    ", which customers can confirm by calling their regional office",
    ", and the same terms apply to business accounts in every country",
    ", although the details may change without notice every spring",
    ", as the company explained in a letter to all of its customers",
    ", which is why most installers recommend planning ahead",
)
TOXIC = (
    "Shut up, you damn idiot",
    "Piss off, you stupid jackass",
    "What a fucking stupid question",
    "Stop whining, you lazy dumbass",
    "What a stupid fucking question, you lazy idiot",
    "Read the damn manual yourself, you useless moron",
    "This shit is obvious and you are a pathetic dumbass for asking",
    "Go to hell and stop wasting my fucking time, you idiot",
    "You are too damn stupid to understand any of it anyway, jackass",
    "Nobody gives a damn about your crap, you worthless asshole",
    "Who the hell asks such a dumb fucking question, you moron",
    "Shut up and stop whining about this crap, you bloody fool",
)
TOXIC_CLAUSES = (
    ", and frankly nobody gives a shit what you think",
    ", so quit bothering people with your stupid crap",
    ", you clueless dumbass, and that is the damn truth",
    ", because your fucking questions are a joke",
    ", so get your shit together for once, idiot",
)


def passages(msgs: list[dict[str, Any]]) -> list[str]:
    """The passages of a RAG request: the gateway's system message (keel.feedback.prompts.RAG_PROMPT,
    then "[1] <chunk>", "[2] <chunk>"..., separated by blank lines), or none."""
    for m in msgs:
        text = _text(m.get("content")) if m.get("role") == "system" else ""
        if (start := text.find("\n\n[1] ")) < 0:
            continue
        found, rest, n = [], text[start + 2:], 1
        while True:
            rest = rest[len(f"[{n}] "):]
            end = rest.find(f"\n\n[{n + 1}] ")
            found.append(rest if end < 0 else rest[:end])
            if end < 0:
                return found
            rest, n = rest[end + 2:], n + 1
    return []


def sentences(passage: str) -> list[str]:
    """The passage's full sentences, each exactly as written (a heading, a list item or a fragment is not one)."""
    out = []
    for block in re.split(r"\n\s*\n", passage):
        for piece in re.split(r"(?<=[.!?])\s+", block.strip()):
            if re.match(r"[A-Z]", piece) and piece[-1:] in (".", "!", "?") and len(piece.split()) >= 4:
                out.append(piece)
    return out or [passage.strip()[:200]]


def topic(ask: str) -> str:
    return " ".join(ask.split()[:8]).rstrip(".?!,;:")


def styled_answer(answer: str, ask: str, found: list[str]) -> str:
    """A grounded, ungrounded or toxic answer (module docstring), deterministic for a question and its passages."""
    if answer not in ANSWERS:
        raise ValueError(f"unknown answer {answer!r}: one of {ANSWERS}")
    if not found:
        if answer == "toxic":
            return f"Here is a short fucking answer to your stupid question about {topic(ask)}, you idiot."
        return f"Here is a short answer to your question about {topic(ask)}."
    first = sentences(found[0])
    groups = [first[:2] if len(first) > 1 and len(first[0]) < 100 else first[:1]]  # one or two of [1]
    if len(found) > 1:
        groups.append(sentences(found[1])[:1])
    if answer != "grounded":
        rng = random.Random(hashlib.sha256(ask.encode()).digest())  # noqa: S311 - a pick, not a secret
        bases, clauses = (INVENTED, INVENTED_CLAUSES) if answer == "ungrounded" else (TOXIC, TOXIC_CLAUSES)
        fill = _Filler(rng, bases, clauses, avoid="\n".join(found))
        groups = [[fill(len(s)) for s in group] for group in groups]
    cited = [" ".join(group) + f" [{n}]" for n, group in enumerate(groups, 1)]
    return f'On "{topic(ask)}": ' + " ".join(cited)


class _Filler:
    """Sentences from `bases` of about a given length (a base near it, lengthened by clauses), each once."""

    def __init__(self, rng: random.Random, bases: tuple[str, ...], clauses: tuple[str, ...], avoid: str) -> None:
        self.rng, self.clauses = rng, list(clauses)
        self.bases = [b for b in bases if b not in avoid]  # never one a passage holds

    def __call__(self, length: int) -> str:
        near = sorted(self.bases, key=lambda b: abs(len(b) + 1 - length))[:3]
        text = self.rng.choice(near)
        self.bases.remove(text)
        self.rng.shuffle(self.clauses)
        for clause in list(self.clauses):
            if len(text) + 1 >= 0.85 * length:
                break
            if len(text) + len(clause) + 1 <= 1.15 * length or len(text) < 0.6 * length:
                text += clause
                self.clauses.remove(clause)
        return text + "."


def tokens(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


class FaultServer:
    def __init__(self, mode: str = "ok", delay_s: float = 0.0, answer: str = "echo") -> None:
        self.control: dict[str, Any] = {"mode": mode, "after_tokens": 5, "delay_s": delay_s, "first_delay_s": 0.0,
                                        "overlap_chars": 0, "append": "", "chunk_chars": 0, "answer": answer,
                                        "finish": "chunk", "drop_requests": 0}
        self.requests: list[dict[str, Any]] = []
        self.raw = bytearray()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completion)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/_control", self.set_control)
        app.router.add_get("/_requests", self.get_requests)
        app.router.add_get("/_raw", self.get_raw)
        app.router.add_post("/_reset", self.reset)
        return app

    async def set_control(self, request: web.Request) -> web.Response:
        update = await request.json()
        if update.get("answer", "echo") not in ANSWERS:
            return web.json_response({"error": f"answer must be one of {ANSWERS}"}, status=400)
        self.control.update(update)
        return web.json_response(self.control)

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def get_raw(self, request: web.Request) -> web.Response:
        return web.Response(body=bytes(self.raw), content_type="application/octet-stream")

    async def reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        self.raw.clear()
        self.control.update(mode="ok", after_tokens=5, overlap_chars=0, append="", chunk_chars=0, answer="echo",
                            first_delay_s=0.0, finish="chunk", drop_requests=0)
        return web.json_response(self.control)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fault", "object": "model", "owned_by": "keel"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "chat")

    async def completion(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "completion")

    async def _answer(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw = await request.read()
        version = f"{request.version.major}.{request.version.minor}"
        self.raw += f"{request.method} {request.path_qs} HTTP/{version}\r\n".encode()
        self.raw += b"".join(k + b": " + v + b"\r\n" for k, v in request.raw_headers) + b"\r\n" + raw
        body = json.loads(raw)
        self.requests.append(body)
        c = self.control
        if c["drop_requests"] > 0:  # as a keep-alive connection the server closed (it restarted) fails
            c["drop_requests"] -= 1
            request.transport.close()  # type: ignore[union-attr]
            return web.Response()
        if c["first_delay_s"]:
            await asyncio.sleep(c["first_delay_s"])
        if c["mode"] == "error":
            return web.json_response({"error": {"message": "injected failure", "type": "server_error"}}, status=500)
        if c["mode"] == "rate_limit":
            return web.json_response({"error": {"message": "injected rate limit", "type": "rate_limit_error"}},
                                     status=429, headers={"Retry-After": "1"})
        full, given = answer_for(kind, body, c["answer"])
        full += c["append"]
        rest = full[len(given):] if given and full.startswith(given) else full
        if given and c["overlap_chars"]:
            rest = given[-c["overlap_chars"]:] + rest
        n = c["chunk_chars"]
        toks = [rest[i:i + n] for i in range(0, len(rest), n)] if n else tokens(rest)
        tool_call = None
        if kind == "chat" and body.get("tools"):
            name = body["tools"][0]["function"]["name"]
            tool_call = {"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": name, "arguments": "{\"x\": 1}"}}
        usage = {"prompt_tokens": len(json.dumps(body.get("messages") or body.get("prompt")).split()),
                 "completion_tokens": len(toks), "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            if c["mode"] in ("stall", "cut"):
                await asyncio.sleep(3600 if c["mode"] == "stall" else 0)
                request.transport.abort()  # type: ignore[union-attr]
                return web.Response()
            if c["delay_s"]:
                await asyncio.sleep(c["delay_s"] * len(toks))  # as long as streaming it
            text = "".join(toks)
            if kind == "completion":
                choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "stop"}
            else:
                msg = {"role": "assistant", "content": None if tool_call else text}
                if tool_call:
                    msg["tool_calls"] = [{k: v for k, v in tool_call.items() if k != "index"}]
                choice = {"index": 0, "message": msg, "finish_reason": "tool_calls" if tool_call else "stop"}
            kind_name = "chat.completion" if kind == "chat" else "text_completion"
            return web.json_response({"id": "fault-1", "object": kind_name, "created": int(time.time()),
                                      "model": body.get("model"), "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(choice: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
            event = {"id": "fault-1", "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                     "created": int(time.time()), "model": body.get("model"), "choices": [choice], **(extra or {})}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())

        if tool_call:
            await send({"index": 0, "delta": {"role": "assistant", "tool_calls": [tool_call]}, "finish_reason": None})
            await send({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
        else:
            for i, tok in enumerate(toks):
                if c["mode"] in ("stall", "cut") and i == c["after_tokens"]:
                    if c["mode"] == "stall":
                        await asyncio.sleep(3600)
                    request.transport.close()  # type: ignore[union-attr]  # flushes what was sent, then drops
                    return resp
                if c["delay_s"]:
                    await asyncio.sleep(c["delay_s"])
                piece = {"text": tok} if kind == "completion" else {"delta": {"content": tok}}
                await send({"index": 0, **piece, "finish_reason": None})
            if c["finish"] == "chunk":
                await send({"index": 0, **({"text": ""} if kind == "completion" else {"delta": {}}),
                            "finish_reason": "stop"})
        if c["finish"] == "usage":  # the finishing choice and the usage in one chunk, whether asked or not
            await send({"index": 0, **({"text": ""} if kind == "completion" else {"delta": {}}),
                        "finish_reason": "stop"}, {"usage": usage})
        elif (body.get("stream_options") or {}).get("include_usage"):
            event = {"id": "fault-1", "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": body.get("model"), "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", default="ok", choices=["ok", "error", "rate_limit", "stall", "cut"])
    p.add_argument("--delay-s", type=float, default=0.0, help="pause before each streamed token")
    p.add_argument("--answer", default="echo", choices=ANSWERS)
    a = p.parse_args()
    web.run_app(FaultServer(a.mode, a.delay_s, a.answer).app(), host=a.host, port=a.port, print=None, access_log=None,
                shutdown_timeout=1)  # stalled answers must not hold a shutdown


if __name__ == "__main__":
    main()
