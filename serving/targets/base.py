"""The target protocol: what the gateway needs from any model backend.

A target streams `Chunk`s for a chat or text-completion request and raises `TargetError` with a
kind that decides what the gateway does next: a `client` error goes back to the caller as a 4xx;
every other kind (connect, timeout, stall, rate_limit, server, cut) fails over to the next target.
Stall and first-token timeouts are enforced once, by the gateway, around every target's stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from keel.policy import ModelTarget

Kind = Literal["chat", "completion"]
ErrorKind = Literal["connect", "timeout", "stall", "rate_limit", "server", "cut", "client"]

CONTINUE_INSTRUCTION = (
    "Your previous message was cut off. Continue it exactly where it stopped: do not repeat any of it, "
    "do not add a preamble."
)


@dataclass
class Chunk:
    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


class TargetError(Exception):
    def __init__(self, kind: ErrorKind, message: str, *, status: int | None = None,
                 retry_after: float | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind, self.status, self.retry_after, self.body = kind, status, retry_after, body

    @property
    def fails_over(self) -> bool:
        return self.kind != "client"


class TargetOptions(BaseModel):
    """Base of every kind's options schema (`ModelTarget.options`)."""

    # Unknown keys are errors: a typo in keel.yaml must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(Protocol):
    config: ModelTarget

    def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        """Chunks of the answer; the last one carries finish_reason (and usage when known)."""
        ...

    def continuation(self, kind: Kind, body: dict[str, Any], sent: str) -> dict[str, Any]:
        """The request that makes this target continue an answer whose first `sent` characters are out."""
        ...

    async def aclose(self) -> None: ...


def instructed_continuation(kind: Kind, body: dict[str, Any], sent: str) -> dict[str, Any]:
    """Continuation for any OpenAI-compatible backend: the partial answer as the assistant's turn,
    then an instruction to go on. (Backends that can prefill the assistant turn do better.)"""
    if kind == "completion":
        return {**body, "prompt": body["prompt"] + sent}
    messages = [*body["messages"], {"role": "assistant", "content": sent},
                {"role": "user", "content": CONTINUE_INSTRUCTION}]
    return {**body, "messages": messages}


def chunk_from_event(kind: Kind, event: dict[str, Any]) -> Chunk:
    """One OpenAI stream event (chat.completion.chunk or text_completion) as a Chunk."""
    choices = event.get("choices") or []
    usage = event.get("usage")
    if not choices:
        return Chunk(usage=usage)
    c = choices[0]
    if kind == "completion":
        return Chunk(text=c.get("text") or "", finish_reason=c.get("finish_reason"), usage=usage)
    delta = c.get("delta") or {}
    return Chunk(text=delta.get("content") or "", tool_calls=delta.get("tool_calls"),
                 finish_reason=c.get("finish_reason"), usage=usage)
