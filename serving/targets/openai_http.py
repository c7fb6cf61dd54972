"""External OpenAI-compatible HTTP endpoints: another provider, a vLLM server, another Keel.

options: base_url (required, e.g. http://host:port/v1), model (the upstream's model id; default
the target's name), api_key_env (the environment variable holding its key; keys never live in
keel.yaml).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from keel.policy import ModelTarget
from serving.targets.base import Chunk, Kind, TargetError, chunk_from_event, instructed_continuation


class OpenAIHTTPTarget:
    def __init__(self, config: ModelTarget, connect_timeout_s: float = 3.0) -> None:
        self.config = config
        opts = config.options
        if not opts.get("base_url"):
            raise ValueError(f"target {config.name}: options.base_url is required for kind openai")
        self.model = str(opts.get("model") or config.name)
        headers = {}
        if env := opts.get("api_key_env"):
            key = os.environ.get(str(env))
            if not key:
                raise ValueError(f"target {config.name}: environment variable {env} (its API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = str(opts["base_url"]).rstrip("/")
        self.headers = headers
        self.connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        # aiohttp, not httpx: measured here, a 25-event SSE answer costs 0.76 ms with aiohttp vs 2.07 ms.
        # Created on first use, inside the replica's event loop. No read timeout: the gateway
        # enforces first-token and stall limits on every target alike.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self.headers, connector=aiohttp.TCPConnector(limit=256),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s),
            )
        return self._session

    def continuation(self, kind: Kind, body: dict[str, Any], sent: str) -> dict[str, Any]:
        return instructed_continuation(kind, body, sent)

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        path = "/chat/completions" if kind == "chat" else "/completions"
        payload = {**body, "model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        finished = False
        try:
            async with self.session().post(self.base_url + path, json=payload) as resp:
                if resp.status >= 400:
                    raise _status_error(resp.status, await resp.read(), resp.headers.get("retry-after"))
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise TargetError("server", f"upstream error event: {event['error']}")
                    chunk = chunk_from_event(kind, event)
                    finished = finished or chunk.finish_reason is not None
                    yield chunk
        except aiohttp.ClientConnectorError as e:
            raise TargetError("connect", f"{self.config.name}: cannot connect: {e}") from e
        except TimeoutError as e:
            raise TargetError("timeout", f"{self.config.name}: connect timeout") from e
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            raise TargetError("cut", f"{self.config.name}: stream broke: {type(e).__name__}") from e
        if not finished:
            raise TargetError("cut", f"{self.config.name}: stream ended without a finish_reason")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _status_error(status: int, raw: bytes, retry_after: str | None) -> TargetError:
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"error": {"message": raw.decode("utf-8", "replace")[:500]}}
    message = f"upstream answered {status}: {str(body.get('error', body))[:300]}"
    if status == 429:
        return TargetError("rate_limit", message, status=status, retry_after=_float(retry_after), body=body)
    if status in (408, 409) or status >= 500:
        return TargetError("server", message, status=status, body=body)
    return TargetError("client", message, status=status, body=body)


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v else None
    except ValueError:
        return None
