"""The OpenAI wire format: request validation, error bodies, responses and stream events.

Bodies are parsed by hand (json + pydantic) instead of by FastAPI's validation, so that every bad
input gets OpenAI's error shape with a 4xx, and the hot path does no extra work.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from keel.routing import Route
    from serving.failover import Outcome
    from serving.targets.base import Chunk, Kind

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        h = dict(headers or {})
        if self.retry_after is not None:
            h["retry-after"] = str(self.retry_after)
        return JSONResponse(self.body(), status_code=self.status, headers=h)


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


def parse(raw: bytes, model: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        missing = err["type"] == "missing"
        raise APIError(400, f"{'missing required parameter' if missing else 'invalid parameter'} "
                            f"{param!r}: {err['msg']}", param=param,
                       code="missing_required_parameter" if missing else "invalid_parameter") from None


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


# -- responses ----------------------------------------------------------------------------------


def request_id() -> str:
    """The request's id: Serve's own (it sets the x-request-id response header, honouring a caller's
    x-request-id), so logs, the response header and Keel's records all carry one id."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside a Serve replica (unit tests): make one
        rid = ""
    return rid or "req-" + uuid.uuid4().hex[:24]


def replica_name() -> str:
    """This Serve replica's unique id (one audit chain per replica), or the process id outside Serve."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a replica (unit tests)
        import os

        return f"pid{os.getpid()}"


def audit_fields(rid: str, tenant: str, endpoint: str, model: str | None, status: int, route: Route | None,
                 outcome: Outcome | None, body: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    """One interaction for the audit trail: the decision and its numbers, hashes of what was sent and
    answered, never the text itself."""
    import hashlib

    from keel.audit import canonical

    out: dict[str, Any] = {"request_id": rid, "tenant": tenant, "endpoint": endpoint, "model": model, "status": status,
                           "latency_ms": round(seconds * 1000, 1)}
    if route is not None:
        out["route"] = {"strategy": route.strategy, "reason": route.reason, "ranked": list(route.ranked),
                        "excluded": route.excluded}
    if body is not None:
        out["prompt_sha256"] = hashlib.sha256(canonical(body)).hexdigest()
    if outcome is not None:
        out |= {"target": outcome.target, "failovers": outcome.failovers, "usage": outcome.usage,
                "ttft_ms": round(outcome.ttft_s * 1000, 1) if outcome.ttft_s is not None else None,
                "response_sha256": outcome.answer.hexdigest() if outcome.target else None}
    return out


def config_fields(settings: Any) -> dict[str, Any]:
    """The configuration a replica decides under, for the audit trail: what routing, residency and the
    guard obey, and a hash of the whole (secrets left out), so a change of policy is on the record."""
    import hashlib

    from keel.audit import canonical

    doc = settings.model_dump(mode="json", include={"gateway", "guard", "policy"}, exclude={"policy": {"tenants"}})
    doc["tenants"] = [t.model_dump(mode="json", exclude={"api_key_hashes"}) for t in settings.policy.tenants]
    return {"event": "gateway_started", "config_sha256": hashlib.sha256(canonical(doc)).hexdigest(),
            "targets": [{"name": t.name, "kind": t.kind, "zone": t.zone, "tier": t.tier} for t in settings.policy.targets],
            "data_classes": doc["policy"]["data_classes"], "guard": doc["guard"], "strategy": doc["gateway"]["strategy"]}


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
    return f"target={target or 'none'}; strategy={route.strategy}; reason={route.reason}"


def keel_field(rid: str, route: Route, outcome: Outcome, citations: list[dict[str, Any]] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "request_id": rid,
        "route": {"target": outcome.target, "strategy": route.strategy, "reason": route.reason,
                  "ranked": list(route.ranked), "excluded": route.excluded},
        "failovers": outcome.failovers,
        "ttft_ms": round(outcome.ttft_s * 1000, 1) if outcome.ttft_s is not None else None,
    }
    if citations is not None:
        out["citations"] = citations
    return out


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
    text = "".join(c.text for c in chunks)
    usage = outcome.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": outcome.finish_reason, "logprobs": None}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls := merge_tool_calls(chunks):
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "finish_reason": outcome.finish_reason, "logprobs": None}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}


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
