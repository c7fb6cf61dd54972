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

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keel.errors import (
    InvalidJSONError,
    InvalidParameterError,
    KeelError,
    MissingParameterError,
    error_body,
    http_status,
)
from keel.feedback import bandit
from keel.messages import text_of
from keel.routing import Exclusion

if TYPE_CHECKING:
    import numpy as np

    from keel.routing import Route
    from serving.failover import Outcome
    from serving.targets.base import Chunk, Kind

M = TypeVar("M", bound=BaseModel)


# Content part types and the target feature each needs (keel.target_kinds.Feature); text needs none.
PART_FEATURES: dict[str, str | None] = {"text": None, "refusal": None, "image_url": "images", "input_audio": "audio",
                                        "file": "files"}
PART_TYPES = {f: t for t, f in PART_FEATURES.items() if f is not None}  # feature -> the part type that needs it


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _known_parts(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        # A part Keel cannot read is refused, never passed on unread or dropped.
        for part in v if isinstance(v, list) else ():
            if part.get("type") not in PART_FEATURES:
                raise ValueError(f"content part type {part.get('type')!r} is not one of {sorted(PART_FEATURES)}")
        return v

    def features(self) -> set[str]:
        """What a target needs to read this message's content parts."""
        if not isinstance(self.content, list):
            return set()
        return {f for p in self.content if (f := PART_FEATURES[p["type"]]) is not None}


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
    stream_options: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)

    def part_features(self) -> set[str]:
        """What a target needs to read the content parts besides text (images, audio, files)."""
        return {f for m in self.messages for f in m.features()}
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


class FeedbackRequest(BaseModel):
    """A caller's feedback on one of its answers (POST /v1/feedback): a rating or a score, and words.
    `comment` and `correction` (the answer it would have preferred) are scrubbed before they are stored."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field must not be a rating silently dropped
    request_id: str = Field(min_length=1, max_length=128)
    rating: Literal["up", "down"] | None = None
    score: float | None = Field(None, ge=0, le=1)
    comment: str | None = None
    correction: str | None = None

    @model_validator(mode="after")
    def _one_verdict(self) -> FeedbackRequest:
        if (self.rating is None) == (self.score is None):
            raise ValueError("give either 'rating' (\"up\" or \"down\") or 'score' (0 to 1), not both or neither")
        return self

    @property
    def value(self) -> float:
        """The verdict as a score: up 1, down 0."""
        return bandit.score(self.score if self.score is not None else self.rating or "")


# The bodies the endpoints parse by hand (parse below), for the OpenAPI document.
BODIES: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest,
                                      "/v1/embeddings": EmbeddingRequest, "/v1/feedback": FeedbackRequest}


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
        if param is None:  # a rule over several fields (a model validator)
            raise InvalidParameterError(err["msg"].removeprefix("Value error, ")) from None
        if err["type"] == "missing":
            raise MissingParameterError(f"missing required parameter {param!r}: {err['msg']}", param=param) from None
        raise InvalidParameterError(f"invalid parameter {param!r}: {err['msg']}", param=param) from None


def openapi(app: FastAPI) -> dict[str, Any]:
    """The API's OpenAPI document (`/openapi.json`): FastAPI's paths, the request bodies the endpoints
    parse by hand, their bearer-key security and OpenAI's error object. Built once."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        from pydantic.json_schema import models_json_schema

        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="OpenAI-compatible: chat completions, completions, embeddings, models; "
                                      "and Keel's own: feedback on an answer, its audit records, the tenant's usage.")
        refs, defs = models_json_schema([(m, "validation") for m in BODIES.values()],
                                        ref_template="#/components/schemas/{model}")
        components = doc.setdefault("components", {})
        components.setdefault("schemas", {}).update(defs.get("$defs", {}))
        components["schemas"]["Error"] = {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                                     "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                    "param": {"type": ["string", "null"]},
                                                    "code": {"type": ["string", "null"]}}}}}
        components["securitySchemes"] = {"ApiKeyAuth": {"type": "http", "scheme": "bearer"}}
        error = {"description": "OpenAI's error object",
                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for path, ops in doc["paths"].items():
            for op in ops.values():
                if path.startswith("/v1/"):
                    op["security"] = [{"ApiKeyAuth": []}]
                    op["responses"]["default"] = error
                if path in BODIES:
                    schema = refs[(BODIES[path], "validation")]
                    op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        app.openapi_schema = doc
    return app.openapi_schema


# -- responses ----------------------------------------------------------------------------------


def error_response(error: KeelError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape, with its status (and Retry-After when the caller should come back)."""
    h = dict(headers or {})
    if error.retry_after is not None:
        h["retry-after"] = str(math.ceil(error.retry_after))
    return JSONResponse(error_body(error), status_code=http_status(error)[0], headers=h)


def error_event(error: KeelError) -> str:
    """An error after a stream began: the status line is gone, so it is an event of its own."""
    return sse(error_body(error))


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
               zones: list[str], guard: dict[str, Any], elapsed_s: float, timings: Mapping[str, float],
               prompt: dict[str, Any] | None = None) -> dict[str, Any]:
    """The response's `keel` field: the final route, every failover, the request's time split into the
    targets' (model_ms) and the gateway's own so far (keel_ms: `elapsed_s` since it arrived, less the
    model's) and by stage (stages_ms), the system prompt variant it got, what retrieval and the guard did."""
    out: dict[str, Any] = {
        "request_id": rid,
        "route": {"target": outcome.target, "strategy": route.strategy, "reason": route.reason,
                  "ranked": list(route.ranked), "excluded": route.excluded_text()},
        "failovers": outcome.failovers,
        "ttft_ms": round(outcome.ttft_s * 1000, 1) if outcome.ttft_s is not None else None,
        "model_ms": round(outcome.model_s * 1000, 1),
        "keel_ms": round(max(0.0, elapsed_s - outcome.model_s) * 1000, 1),
        "stages_ms": {name: round(s * 1000, 3) for name, s in timings.items()},
    }
    if prompt is not None:
        out["prompt"] = prompt
    if citations is not None:
        out["citations"] = citations
    return out | {"data_class": data_class, "zones": zones, "guard": guard}


def server_timing(timings: Mapping[str, float], elapsed_s: float, model_s: float) -> str:
    """The W3C Server-Timing header: each stage so far, then the gateway's own time and the model's, in ms.
    Browsers' developer tools and `curl -i` show it; the `keel` field has the same split."""
    parts = [f"{name};dur={s * 1000:.3f}" for name, s in timings.items()]
    parts.append(f'keel;dur={max(0.0, elapsed_s - model_s) * 1000:.3f};desc="gateway"')
    parts.append(f'model;dur={model_s * 1000:.3f};desc="model"')
    return ", ".join(parts)


def sse(data: Mapping[str, Any]) -> str:
    """One server-sent event: an unnamed `data:` line, the only kind every SSE client delivers."""
    return f"data: {json.dumps(data)}\n\n"


def chunk_body(kind: Kind, meta: dict[str, Any], c: Chunk, role: bool = False) -> dict[str, Any]:
    if kind == "completion":
        choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
        return {**meta, "object": "text_completion", "choices": [choice]}
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if c.text or not c.tool_calls:
        delta["content"] = c.text
    if c.tool_calls:
        delta["tool_calls"] = c.tool_calls
    choice = {"index": 0, "delta": delta, "finish_reason": c.finish_reason, "logprobs": None}
    return {**meta, "object": "chat.completion.chunk", "choices": [choice]}


def usage_chunk(kind: Kind, meta: dict[str, Any], usage: dict[str, int] | None) -> dict[str, Any]:
    """The stream's last chunk when the caller asked `stream_options.include_usage`: no choices, the usage."""
    return {**meta, "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
            "choices": [], "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def gathered(kind: Kind, meta: dict[str, Any], chunks: list[Chunk], outcome: Outcome) -> dict[str, Any]:
    """A whole answer: the stream's chunks in one body. Its finish_reason is the last chunk's (the
    guard's "content_filter" when it blocked the answer)."""
    text = "".join(c.text for c in chunks)
    usage = outcome.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    finish = next((c.finish_reason for c in reversed(chunks) if c.finish_reason), outcome.finish_reason)
    if kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
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
