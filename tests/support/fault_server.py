"""A small OpenAI-compatible server that can be told to fail: for failover tests and benchmarks.

    python -m tests.support.fault_server --port 9100 [--mode ok] [--delay-s 0.0]

It answers /v1/chat/completions and /v1/completions (streaming and not) with a deterministic
answer: "Echo: <the last user message>." plus a fixed sentence. Asked to continue a cut answer
(the partial answer as the assistant's turn), it goes on from where the partial answer stops.
Every request is recorded: as a capture server standing in for an external provider, it keeps every
byte it received (request line, headers, body). Control it over HTTP:

    POST /_control {"mode": "ok|error|rate_limit|stall|cut", "after_tokens": 5, "delay_s": 0.01,
                    "overlap_chars": 0, "append": "", "chunk_chars": 0}
    GET  /_requests    every request body received, oldest first
    GET  /_raw         every byte received on the model endpoints, as one octet stream
    POST /_reset       forget requests, back to mode ok

mode: error -> 500; rate_limit -> 429 with Retry-After; stall -> `after_tokens` tokens, then
silence; cut -> `after_tokens` tokens, then the connection is dropped. overlap_chars makes a
continuation first repeat that many characters of the partial answer (as real models do). append
adds a fixed text to every answer (a model volunteering something it was not asked); chunk_chars > 0
streams pieces of that many characters instead of words (so a word can arrive split).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

from aiohttp import web

TAIL = ("Keel routes each request to a healthy model target and fails over without the caller "
        "noticing, even in the middle of a streamed answer.")
CONTINUE_MARK = "was cut off"


def answer_for(kind: str, body: dict[str, Any]) -> tuple[str, str]:
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
    ask = users[-1].get("content") if users else ""
    ask = ask if isinstance(ask, str) else " ".join(p.get("text", "") for p in ask or [])
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return json.dumps({"echo": ask[:200]}), given
    return f"Echo: {ask[:200]}. {TAIL}", given


def tokens(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


class FaultServer:
    def __init__(self, mode: str = "ok", delay_s: float = 0.0) -> None:
        self.control: dict[str, Any] = {"mode": mode, "after_tokens": 5, "delay_s": delay_s, "overlap_chars": 0,
                                        "append": "", "chunk_chars": 0}
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
        self.control.update(await request.json())
        return web.json_response(self.control)

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def get_raw(self, request: web.Request) -> web.Response:
        return web.Response(body=bytes(self.raw), content_type="application/octet-stream")

    async def reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        self.raw.clear()
        self.control.update(mode="ok", after_tokens=5, overlap_chars=0, append="", chunk_chars=0)
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
        if c["mode"] == "error":
            return web.json_response({"error": {"message": "injected failure", "type": "server_error"}}, status=500)
        if c["mode"] == "rate_limit":
            return web.json_response({"error": {"message": "injected rate limit", "type": "rate_limit_error"}},
                                     status=429, headers={"Retry-After": "1"})
        full, given = answer_for(kind, body)
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
            await send({"index": 0, **({"text": ""} if kind == "completion" else {"delta": {}}),
                        "finish_reason": "stop"})
        if (body.get("stream_options") or {}).get("include_usage"):
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
    a = p.parse_args()
    web.run_app(FaultServer(a.mode, a.delay_s).app(), host=a.host, port=a.port, print=None, access_log=None,
                shutdown_timeout=1)  # stalled answers must not hold a shutdown


if __name__ == "__main__":
    main()
