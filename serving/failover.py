"""The one code path every request takes through its ranked targets, streaming or not.

Targets always stream to the gateway; a non-streaming response is the same stream gathered.
Before the first token, a failing target is simply replaced by the next. After it, the next
target is asked to continue the answer from the text already sent (its `continuation`), and
whatever it repeats of that text is trimmed, so the caller sees one uninterrupted answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from keel.breaker import CircuitBreaker
from keel.routing import LatencyStats
from serving.targets.base import Chunk, Kind, Target, TargetError

T = TypeVar("T")
MIN_OVERLAP = 16  # shorter repeats of the sent text's tail are kept: they may be genuine text


@dataclass
class TargetState:
    """The gateway's live view of one target: breaker, latency averages, load."""

    target: Target
    breaker: CircuitBreaker
    stats: LatencyStats
    max_in_flight: int
    in_flight: int = 0
    served: int = 0
    failed: int = 0


@dataclass
class Limits:
    request_timeout_s: float
    first_token_timeout_s: float
    stall_timeout_s: float


@dataclass
class Outcome:
    """What happened, for the x-keel-route header, the final keel.route event and the audit trail."""

    target: str | None = None  # the target answering (the last one, once done)
    failovers: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] | None = None
    finish_reason: str | None = None
    ttft_s: float | None = None
    answer: Any = field(default_factory=hashlib.sha256)  # of the text the caller got, for the audit trail


class NoTargetLeft(Exception):
    def __init__(self, outcome: Outcome, last: TargetError | None, busy: bool) -> None:
        super().__init__("every target failed or is unavailable")
        self.outcome, self.last, self.busy = outcome, last, busy


async def run(
    states: dict[str, TargetState], ranked: Sequence[str], kind: Kind, body: dict[str, Any], limits: Limits,
    outcome: Outcome,
) -> AsyncIterator[Chunk]:
    start = time.monotonic()
    deadline = start + limits.request_timeout_s
    sent = ""
    last: TargetError | None = None
    busy = True
    for name in ranked:
        st = states[name]
        if time.monotonic() >= deadline:
            break
        if st.in_flight >= st.max_in_flight:
            outcome.failovers.append({"target": name, "error": "busy", "after_chars": len(sent)})
            continue
        busy = False
        if not st.breaker.allow():
            outcome.failovers.append({"target": name, "error": "circuit_open", "after_chars": len(sent)})
            continue
        outcome.target = name  # the target answering now; final once the loop returns
        request = st.target.continuation(kind, body, sent) if sent else body
        trim = _Overlap(sent) if sent else None
        st.in_flight += 1
        t0 = time.monotonic()
        first: float | None = None
        verdict = False
        try:
            stream = st.target.stream(kind, request)
            limit = _Deadline()
            try:
                while True:
                    wait = limits.first_token_timeout_s if first is None else limits.stall_timeout_s
                    try:
                        chunk = await limit.run(anext(stream), min(wait, deadline - time.monotonic()))
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        what = "stall" if first is not None else "timeout"
                        raise TargetError(what, f"{name}: no token for {wait:.1f}s") from None
                    if first is None and (chunk.text or chunk.tool_calls):
                        first = time.monotonic() - t0
                        if outcome.ttft_s is None:
                            outcome.ttft_s = time.monotonic() - start
                    text = trim.feed(chunk.text, final=chunk.finish_reason is not None) if trim else chunk.text
                    if text or chunk.tool_calls or chunk.finish_reason or chunk.usage:
                        sent += text
                        outcome.answer.update(text.encode())
                        yield Chunk(text, chunk.tool_calls, chunk.finish_reason, chunk.usage)
                    if chunk.finish_reason:
                        outcome.finish_reason = chunk.finish_reason
                    if chunk.usage:
                        outcome.usage = chunk.usage
            finally:
                limit.close()
                await stream.aclose()
            if outcome.finish_reason is None:
                raise TargetError("cut", f"{name}: stream ended without a finish_reason")
            st.breaker.success()
            verdict = True
            st.served += 1
            st.stats.observe(latency_s=time.monotonic() - t0, ttft_s=first)
            return
        except TargetError as e:
            if not e.fails_over and not sent:
                st.breaker.success()  # the target is fine; the request is not
                verdict = True
                raise
            st.breaker.failure()
            verdict = True
            st.failed += 1
            last = e
            outcome.failovers.append({"target": name, "error": e.kind, "message": str(e)[:200], "after_chars": len(sent)})
        finally:
            st.in_flight -= 1
            if not verdict:
                st.breaker.release()  # the caller went away mid-request: no verdict on the target
    outcome.target = None
    raise NoTargetLeft(outcome, last, busy and last is None)


async def prepend(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """The stream again, with its first chunk (taken early, to answer errors before any header) back in front."""
    yield first
    async for chunk in rest:
        yield chunk


class _Deadline:
    """A time limit on each wait for the next chunk, with one timer per target instead of one per chunk.

    asyncio.timeout around every chunk costs a timer handle and a heap push per token. Here a wait
    only moves `expires`; the timer, when it fires early (a later wait moved it), re-arms for the
    new time, and cancels the task only while it is really waiting and `expires` has passed. Time
    the caller spends elsewhere between chunks (sending to a slow client) never counts.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task[Any] | None = None  # the one waiting now: a stream may move between tasks
        self.expires = 0.0
        self.waiting = self.fired = False
        self.timer: asyncio.TimerHandle | None = None

    async def run(self, step: Awaitable[T], seconds: float) -> T:
        self.expires = self.loop.time() + max(0.001, seconds)
        if self.timer is None or self.timer.when() > self.expires:  # (a stall limit shorter than the first-token one)
            self.close()
            self.timer = self.loop.call_at(self.expires, self._check)
        self.task = task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self.waiting = True
        try:
            return await step
        except asyncio.CancelledError:
            if self._took_back(cancelling):  # our own cancel, not the caller's: a timeout
                raise TimeoutError from None
            raise
        finally:
            self.waiting = False
            self._took_back(cancelling)

    def _took_back(self, cancelling: int) -> bool:
        fired, self.fired = self.fired, False
        return fired and self.task is not None and self.task.uncancel() <= cancelling

    def _check(self) -> None:
        self.timer = None
        if not self.waiting:
            return  # re-armed by the next wait
        if self.loop.time() < self.expires:
            self.timer = self.loop.call_at(self.expires, self._check)
        else:
            self.fired = True
            assert self.task is not None
            self.task.cancel()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Overlap:
    """Drops what a continuing target repeats of the text already sent (the tail of it)."""

    def __init__(self, sent: str) -> None:
        self.sent = sent
        self.window = min(len(sent), 256)
        self.buf: str | None = ""

    def feed(self, text: str, final: bool = False) -> str:
        if self.buf is None:
            return text
        self.buf += text
        if len(self.buf) < self.window and not final:
            return ""
        buf, self.buf = self.buf, None
        for m in range(min(len(buf), self.window), 0, -1):
            # A long repeat of the tail is trimmed; so is a restart that repeats everything sent.
            if (m >= MIN_OVERLAP or m == len(self.sent)) and self.sent.endswith(buf[:m]):
                return buf[m:]
        return buf
