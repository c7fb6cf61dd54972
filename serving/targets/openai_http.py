"""External OpenAI-compatible HTTP endpoints: another provider, a vLLM server, another Keel.

External: whatever leaves the cluster for it is pseudonymized first, for every data class.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from pydantic import Field, SecretStr, field_validator

from keel.errors import ConfigError
from keel.policy import ModelTarget
from keel.settings import GatewaySettings
from keel.target_kinds import TargetKind
from serving.targets.base import Chunk, Kind, TargetError, TargetOptions, chunk_from_event, instructed_continuation


class OpenAIOptions(TargetOptions):
    base_url: str = Field(pattern=r"^https?://\S+$", description="e.g. http://host:port/v1")
    model: str | None = Field(None, min_length=1, description="the upstream's model id; default the target's name")
    # The environment variable (or file in $KEEL_SECRETS_DIR) holding its key: keys never live in keel.yaml.
    api_key_env: str | None = Field(None, min_length=1)
    # The key itself, read from api_key_env where the gateway is deployed (serving.app) and handed to the replicas.
    api_key: SecretStr | None = None

    @field_validator("api_key", mode="before")
    @classmethod
    def _never_in_config(cls, v: object) -> object:
        if v is not None and not isinstance(v, SecretStr):
            raise ValueError("keys never live in keel.yaml; name the variable holding it in api_key_env")
        return v


class OpenAIHTTPTarget:
    def __init__(self, config: ModelTarget, options: OpenAIOptions, handle: None, gateway: GatewaySettings) -> None:
        self.config = config
        self.model = options.model or config.name
        headers = {}
        if env := options.api_key_env:
            # Read where the gateway was deployed (serving.app); from this process's environment only failing that.
            key = options.api_key.get_secret_value() if options.api_key else os.environ.get(env)
            if not key:
                raise ConfigError(f"targets.{config.name}.options.api_key_env: environment variable {env} "
                                  "(its API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = options.base_url.rstrip("/")
        self.headers = headers
        self.connect_timeout_s = gateway.connect_timeout_s
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
        finished = done = False
        try:
            async with await self._post(self.base_url + path, payload) as resp:
                if resp.status >= 400:
                    raise _status_error(resp.status, await resp.read(), resp.headers.get("retry-after"))
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
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
        if finished:
            return
        if not done:
            raise TargetError("cut", f"{self.config.name}: stream ended with neither a finish_reason nor [DONE]")
        # Several servers and proxies end a complete answer with [DONE] and no finish_reason: only a stream
        # that stops before [DONE] is cut.
        yield Chunk(finish_reason="stop")

    async def _post(self, url: str, payload: dict[str, Any]) -> aiohttp.ClientResponse:
        """The response's head. A pooled keep-alive connection the upstream closed (it restarted) fails
        before any answer: once more, on another connection, before it counts as the target's failure."""
        try:
            return await self.session().post(url, json=payload)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            if isinstance(e, aiohttp.ClientConnectorError):  # no connection at all: nothing to retry
                raise
            return await self.session().post(url, json=payload)

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


KIND = TargetKind(name="openai", external=True, options=OpenAIOptions, target=OpenAIHTTPTarget,
                  supports=frozenset({"tools", "response_format", "images", "audio", "files"}))
