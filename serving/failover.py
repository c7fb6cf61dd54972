"""The one code path every request takes through its ranked targets, streaming or not.

Targets always stream to the gateway; a non-streaming response is the same stream gathered.
Before the first token, a failing target is simply replaced by the next. After it, the next
target is asked to continue the answer from the text already sent (its `continuation`), and
whatever it repeats of that text is trimmed, so the caller sees one uninterrupted answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
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
    # The targets' share of the request's time: each attempt from its request to its last chunk (or its
    # failure), summed; the rest (the stages, the choice of the next target) is Keel's. A stream is read
    # when the caller asks for its next chunk, so a caller slower than the target counts as model time;
    # small here: targets (the llama.cpp replica, providers) generate in another process meanwhile.
    model_s: float = 0.0
    answer: Any = field(default_factory=hashlib.sha256)  # of the text the caller got, for the audit trail
    kept: list[str] | None = None  # the text itself, as the model wrote it, when the exchange is retained
    # Each target tried, for the request's trace: (name, start, end on the gateway's clock, error kind or None);
    # one skipped (busy, circuit open) starts and ends at once.
    attempts: list[tuple[str, float, float, str | None]] = field(default_factory=list)


class NoTargetLeftError(Exception):
    def __init__(self, outcome: Outcome, last: TargetError | None, busy: bool) -> None:
        super().__init__("every target failed or is unavailable")
        self.outcome, self.last, self.busy = outcome, last, busy


async def run(
    states: Mapping[str, TargetState], ranked: Sequence[str], kind: Kind, body: dict[str, Any], limits: Limits,
    outcome: Outcome, clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[Chunk, None]:
    """The answer of the first target in `ranked` that gives a whole one, continued by the next when one
    fails midway. Raises NoTargetLeftError when none is left, or a target's client error (the
    request's fault) before any text, as the target reported it. `clock`: the gateway's (tests fake it)."""
    walk = _Walk(states, ranked, limits, outcome, clock)
    sent = ""
    while (st := walk.next(sent)) is not None:
        trim = _Overlap(sent) if sent else None
        try:
            stream = st.target.stream(kind, st.target.continuation(kind, body, sent) if sent else body)
            limit = _Deadline()
            try:
                while True:
                    wait = limits.first_token_timeout_s if walk.first is None else limits.stall_timeout_s
                    try:
                        chunk = await limit.run(anext(stream), min(wait, walk.deadline - walk.clock()))
                        walk.heard()
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise TargetError("stall" if walk.first is not None else "timeout",
                                          f"{st.target.config.name}: no token for {wait:.1f}s") from None
                    if walk.first is None and (chunk.text or chunk.tool_calls):
                        walk.first_token()
                    text = trim.feed(chunk.text, final=chunk.finish_reason is not None) if trim else chunk.text
                    if text or chunk.tool_calls or chunk.finish_reason or chunk.usage:
                        sent += text
                        yield walk.passed(chunk, text)
            finally:
                limit.close()
                if isinstance(stream, AsyncGenerator):
                    await stream.aclose()
            walk.succeeded(st)
            return
        except TargetError as e:
            if not walk.failed(st, e, sent):
                raise
        finally:
            walk.done(st)
    raise walk.exhausted()


class _Walk:
    """One request's way down its ranked targets: which one answers now, and each one's verdict."""

    def __init__(self, states: Mapping[str, TargetState], ranked: Sequence[str], limits: Limits,
                 outcome: Outcome, clock: Callable[[], float]) -> None:
        self.states, self.todo, self.outcome, self.clock = states, iter(ranked), outcome, clock
        self.start = clock()
        self.deadline = self.start + limits.request_timeout_s
        self.last: TargetError | None = None
        self.busy = True  # every target tried was at capacity
        # Of the target answering now: when it began, when it was last heard from (its last chunk or its
        # failure), its time to first token, whether it has a verdict.
        self.t0 = self.heard_at = 0.0
        self.verdict = False
        self.first: float | None = None
        self.error: str | None = None  # of the target answering now, once it failed

    def next(self, sent: str) -> TargetState | None:
        """The next target that may take the request (now holding one of its slots), or None."""
        for name in self.todo:
            if self.clock() >= self.deadline:
                return None
            st = self.states[name]
            why = "busy" if st.in_flight >= st.max_in_flight else None
            if why is None:
                self.busy = False
                why = None if st.breaker.allow() else "circuit_open"
            if why is not None:
                self.outcome.failovers.append({"target": name, "error": why, "after_chars": len(sent)})
                now = self.clock()
                self.outcome.attempts.append((name, now, now, why))
                continue
            self.outcome.target = name  # final once run returns
            st.in_flight += 1
            self.t0 = self.heard_at = self.clock()  # just before its request goes out
            self.first, self.verdict, self.error = None, False, None
            return st
        return None

    def heard(self) -> None:
        self.heard_at = self.clock()

    def first_token(self) -> None:
        self.first = self.heard_at - self.t0
        if self.outcome.ttft_s is None:
            self.outcome.ttft_s = self.heard_at - self.start

    def passed(self, chunk: Chunk, text: str) -> Chunk:
        """A chunk on its way to the caller (`text`: what is left of its text once repeats are trimmed)."""
        self.outcome.answer.update(text.encode())
        if self.outcome.kept is not None:
            self.outcome.kept.append(text)
        if chunk.finish_reason:
            self.outcome.finish_reason = chunk.finish_reason
        if chunk.usage:
            self.outcome.usage = chunk.usage
        return Chunk(text, chunk.tool_calls, chunk.finish_reason, chunk.usage)

    def succeeded(self, st: TargetState) -> None:
        if self.outcome.finish_reason is None:
            raise TargetError("cut", f"{st.target.config.name}: stream ended without a finish_reason")
        st.breaker.success()
        self.verdict = True
        st.served += 1
        st.stats.observe(latency_s=self.clock() - self.t0, ttft_s=self.first)

    def failed(self, st: TargetState, e: TargetError, sent: str) -> bool:
        """Counts a failure against the target; False for a client error before any text: the target
        is fine, the request is not, and the error goes back to the caller."""
        self.heard()
        self.verdict, self.error = True, e.kind
        if not e.fails_over and not sent:
            st.breaker.success()
            return False
        st.breaker.failure()
        st.failed += 1
        self.last = e
        self.outcome.failovers.append({"target": st.target.config.name, "error": e.kind, "message": str(e)[:200],
                                       "after_chars": len(sent)})
        return True

    def done(self, st: TargetState) -> None:
        self.outcome.model_s += self.heard_at - self.t0
        error = self.error if self.verdict else "cancelled"  # the caller went away mid-request
        self.outcome.attempts.append((st.target.config.name, self.t0, self.heard_at, error))
        st.in_flight -= 1
        if not self.verdict:
            st.breaker.release()  # the caller went away mid-request: no verdict on the target

    def exhausted(self) -> NoTargetLeftError:
        self.outcome.target = None
        return NoTargetLeftError(self.outcome, self.last, self.busy and self.last is None)


def retry_after(states: Iterable[TargetState], floor_s: int) -> int:
    """When a caller refused for want of a target should come back: when the first open breaker
    lets a probe through, never sooner than `floor_s`."""
    waits = [s.breaker.probe_in() for s in states if s.breaker.state == "open"]
    return max(floor_s, math.ceil(min(waits))) if waits else floor_s


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
        if task is None:
            raise RuntimeError("a time limit on a wait needs the asyncio task that waits")
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
        if not self.waiting or self.task is None:
            return  # re-armed by the next wait
        if self.loop.time() < self.expires:
            self.timer = self.loop.call_at(self.expires, self._check)
        else:
            self.fired = True
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
