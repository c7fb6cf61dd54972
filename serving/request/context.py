"""One request's state on its way through the stages: what each stage found, decided and did."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from keel.errors import KeelError, http_status
from keel.guard import Actions
from keel.routing import DEFAULT_MAX_TOKENS

if TYPE_CHECKING:
    from keel.feedback.prompts import Variant
    from keel.guard import AnswerGuard
    from keel.policy import DataClass, Tenant
    from keel.routing import Route
    from serving.api import ChatRequest, CompletionRequest
    from serving.failover import Outcome
    from serving.targets.base import Chunk, Kind

Endpoint = Literal["chat", "completions", "embeddings"]
T = TypeVar("T")


class Inbound(Protocol):
    """What the stages read of the HTTP request (Starlette's Request is one)."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def body(self) -> bytes: ...


@dataclass(slots=True)
class RequestContext:
    http: Inbound
    endpoint: Endpoint
    rid: str  # the request's id (Serve's, the x-request-id header)
    started: float  # the gateway's clock when it arrived
    tenant: Tenant | None = None  # authenticate
    # parse: the request, the body as targets get it (grounded, then protected, later), its text
    request: ChatRequest | CompletionRequest | None = None
    model: str | None = None  # as the caller named it
    body: dict[str, Any] | None = None
    prompt_text: str = ""
    ask: str = ""  # the last user message: what retrieval and the complexity score read
    max_tokens: int = DEFAULT_MAX_TOKENS
    data_class: DataClass | None = None  # scope
    zones: list[str] = field(default_factory=list)
    retain: bool = False  # scope: the exchange is kept for the fine-tuning dataset (the tenant opted in)
    charged: int = 0  # admit: tokens charged to the tenant, settled by record
    variant: Variant | None = None  # prompt: the system prompt variant chosen for it, if its model has any
    citations: list[dict[str, Any]] | None = None  # ground
    passages: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # ground: message -> its passages
    route: Route | None = None  # route
    actions: Actions = field(default_factory=Actions)  # protect and check: what the guard did
    answer_guard: AnswerGuard | None = None
    outcome: Outcome | None = None  # generate: what happened, once generation began
    stream: AsyncGenerator[Chunk, None] | None = None  # the failover stream, until released
    first: Chunk | None = None  # taken early (a failure before it is still an HTTP error), not yet passed on
    rest: AsyncIterator[Chunk] | None = None  # the chunks after it; check wraps them
    result: dict[str, Any] | None = None  # a whole answer made by a stage (embeddings)
    headers: dict[str, str] = field(default_factory=dict)  # of the response
    status: int = 499  # until the answer is complete or refused: the caller left before
    error: KeelError | None = None
    finished: bool = False  # recorded
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, by its name
    cost: float = 0.0  # record: what the answer cost at its target's prices

    @property
    def kind(self) -> Kind:
        """What targets are asked for (the embeddings endpoint asks none)."""
        return "chat" if self.endpoint == "chat" else "completion"

    def fail(self, error: KeelError) -> None:
        self.error, self.status = error, http_status(error)[0]


def required(value: T | None) -> T:
    """What an earlier stage set; missing, the stages run out of order (a bug, not the caller's fault)."""
    if value is None:
        raise RuntimeError("a stage read what an earlier stage should have set: check the order of stages")
    return value


def request_id() -> str:
    """The request's id: Serve's own (it sets the x-request-id response header, honouring a caller's
    x-request-id), so logs, the response header and Keel's records all carry one id."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = str(_get_serve_request_context().request_id)
    except Exception:  # noqa: BLE001 - outside a Serve replica (unit tests): make one
        rid = ""
    return rid or "req-" + uuid.uuid4().hex[:24]
