"""The OpenAI wire format: request validation, error bodies, responses and stream events.

Bodies are parsed by hand (json + pydantic) instead of by FastAPI's validation, so that every bad
input gets OpenAI's error shape with a 4xx, and the hot path does no extra work.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keel.errors import (
    InvalidJSONError,
    InvalidParameterError,
    KeelError,
    MissingParameterError,
    error_body,
    http_status,
)
from keel.messages import text_of
from keel.routing import Exclusion

if TYPE_CHECKING:
    import numpy as np

    from keel.routing import Route
    from serving.failover import Outcome
    from serving.targets.base import Chunk, Kind

M = TypeVar("M", bound=BaseModel)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields pass through to targets that take them
    model: str = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    rag: bool = False  # ground the answer in the vector index (same as model "keel/rag")

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        return v or None


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


def parse(raw: bytes, model: type[M]) -> M:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidJSONError(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidJSONError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "missing":
            raise MissingParameterError(f"missing required parameter {param!r}: {err['msg']}", param=param) from None
        raise InvalidParameterError(f"invalid parameter {param!r}: {err['msg']}", param=param) from None


# -- responses ----------------------------------------------------------------------------------


def error_response(error: KeelError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape, with its status (and Retry-After when the caller should come back)."""
    h = dict(headers or {})
    if error.retry_after is not None:
        h["retry-after"] = str(math.ceil(error.retry_after))
    return JSONResponse(error_body(error), status_code=http_status(error)[0], headers=h)


def error_event(error: KeelError) -> str:
    """An error after a stream began: the status line is gone, so it is an event of its own."""
    return f"data: {json.dumps(error_body(error))}\n\n"


def target_body(kind: Kind, req: Any) -> tuple[dict[str, Any], str, str]:
    """The request as targets get it (no model/stream/Keel fields), its whole text, and the ask."""
    body = req.model_dump(exclude_none=True, exclude={"model", "stream", "rag", "n", "stream_options"})
    if kind == "completion":
        return body, req.prompt, req.prompt
    if req.max_completion_tokens and not req.max_tokens:
        body["max_tokens"] = body.pop("max_completion_tokens")
    texts = [text_of(m.content) for m in req.messages]
    asks = [text_of(m.content) for m in req.messages if m.role == "user"]
    return body, "\n".join(texts), asks[-1] if asks else texts[-1]


def route_header(target: str | None, route: Route) -> str:
    """target, strategy and reason; then the targets evaluation kept out (quality, canary), if any."""
    held = [f"{n}:{why.reason.value}" for n, why in route.excluded.items()
            if why.reason in (Exclusion.QUALITY, Exclusion.CANARY)]
    return (f"target={target or 'none'}; strategy={route.strategy}; reason={route.reason}"
            + (f"; excluded={','.join(held)}" if held else ""))


def keel_field(rid: str, route: Route, outcome: Outcome, citations: list[dict[str, Any]] | None, data_class: str,
               zones: list[str], guard: dict[str, Any], elapsed_s: float) -> dict[str, Any]:
    """The response's `keel` field: the final route, every failover, the request's time split into the
    targets' (model_ms) and the gateway's own so far (keel_ms: `elapsed_s` since it arrived, less the
    model's), what retrieval and the guard did."""
    out: dict[str, Any] = {
        "request_id": rid,
        "route": {"target": outcome.target, "strategy": route.strategy, "reason": route.reason,
                  "ranked": list(route.ranked), "excluded": route.excluded_text()},
        "failovers": outcome.failovers,
        "ttft_ms": round(outcome.ttft_s * 1000, 1) if outcome.ttft_s is not None else None,
        "model_ms": round(outcome.model_s * 1000, 1),
        "keel_ms": round(max(0.0, elapsed_s - outcome.model_s) * 1000, 1),
    }
    if citations is not None:
        out["citations"] = citations
    return out | {"data_class": data_class, "zones": zones, "guard": guard}


def sse_chunk(kind: Kind, meta: dict[str, Any], c: Chunk, role: bool = False) -> str:
    if kind == "completion":
        choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
        return f"data: {json.dumps({**meta, 'object': 'text_completion', 'choices': [choice]})}\n\n"
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if c.text or not c.tool_calls:
        delta["content"] = c.text
    if c.tool_calls:
        delta["tool_calls"] = c.tool_calls
    choice = {"index": 0, "delta": delta, "finish_reason": c.finish_reason, "logprobs": None}
    return f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"


def gathered(kind: Kind, meta: dict[str, Any], chunks: list[Chunk], outcome: Outcome) -> dict[str, Any]:
    """A whole answer: the stream's chunks in one body. Its finish_reason is the last chunk's (the
    guard's "content_filter" when it blocked the answer)."""
    text = "".join(c.text for c in chunks)
    usage = outcome.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    finish = next((c.finish_reason for c in reversed(chunks) if c.finish_reason), outcome.finish_reason)
    if kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls := merge_tool_calls(chunks):
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}


def embeddings(model: str, vectors: np.ndarray, encoding_format: str, tokens: int) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding_format == "base64"
             else v.tolist()} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def merge_tool_calls(chunks: list[Chunk]) -> list[dict[str, Any]]:
    """Streamed tool-call deltas (by index, arguments in pieces) -> whole tool calls."""
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks:
        for d in c.tool_calls or []:
            call = calls.setdefault(d.get("index", 0), {"id": None, "type": "function",
                                                        "function": {"name": "", "arguments": ""}})
            call["id"] = d.get("id") or call["id"]
            fn = d.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]
