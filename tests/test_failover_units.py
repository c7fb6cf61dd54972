"""The failover path's own timing rules, without a server: the per-chunk time limit, and the model's share of
a request's time (on a fake clock the fake targets advance)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from keel.breaker import CircuitBreaker
from keel.policy import ModelTarget
from keel.routing import LatencyStats
from serving import failover
from serving.failover import Limits, Outcome, TargetState, _Deadline
from serving.targets.base import Chunk, TargetError


async def ticks(gaps: list[float]) -> AsyncIterator[int]:
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield i


async def drain(gaps: list[float], first_s: float, stall_s: float, consumer_s: float = 0.0) -> list[int]:
    limit, got, stream = _Deadline(), [], ticks(gaps)
    try:
        while True:
            try:
                got.append(await limit.run(anext(stream), stall_s if got else first_s))
            except StopAsyncIteration:
                return got
            await asyncio.sleep(consumer_s)  # the caller busy elsewhere between chunks
    finally:
        limit.close()


def test_a_steady_stream_finishes_and_a_stall_times_out_after_its_limit():
    assert asyncio.run(drain([0.01] * 20, first_s=0.2, stall_s=0.1)) == list(range(20))
    loop_time = []

    async def stalled() -> None:
        t0 = asyncio.get_running_loop().time()
        try:
            await drain([0.0, 0.0, 5.0], first_s=1.0, stall_s=0.15)
        finally:
            loop_time.append(asyncio.get_running_loop().time() - t0)

    with pytest.raises(TimeoutError):
        asyncio.run(stalled())
    assert 0.14 <= loop_time[0] < 0.6  # the shorter stall limit, not the first-token one


def test_time_spent_between_chunks_by_the_caller_does_not_count():
    # Each wait is short, but the caller sleeps longer than the limit after every chunk.
    assert asyncio.run(drain([0.01] * 5, first_s=0.1, stall_s=0.1, consumer_s=0.25)) == list(range(5))


def test_a_caller_cancelling_is_a_cancel_not_a_timeout():
    async def main() -> None:
        task = asyncio.create_task(drain([0.0, 10.0], first_s=5, stall_s=5))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


# -- model time ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class TimedTarget:
    """Takes `first_s` of the fake clock to its first word and `each_s` to each next one; may fail after some."""

    def __init__(self, name: str, clock: Clock, words: tuple[str, ...], *, first_s: float, each_s: float = 0.0,
                 fail_after: int | None = None, fail_s: float = 0.0) -> None:
        self.config = ModelTarget(name=name, kind="openai", zone="us", price_per_1k_input=0.1,
                                  price_per_1k_output=0.1, tier="small", max_context=4096)
        self.clock, self.words, self.first_s, self.each_s = clock, words, first_s, each_s
        self.fail_after, self.fail_s = fail_after, fail_s

    async def stream(self, kind: str, body: dict) -> AsyncIterator[Chunk]:
        for i, w in enumerate(self.words):
            if i == self.fail_after:
                self.clock.t += self.fail_s
                raise TargetError("cut" if i else "server", "dropped")
            self.clock.t += self.first_s if i == 0 else self.each_s
            yield Chunk(w)
        yield Chunk("", finish_reason="stop")

    def continuation(self, kind: str, body: dict, sent: str) -> dict:
        return body


def timed_answer(clock: Clock, *targets: TimedTarget, caller_s: float = 0.0) -> tuple[str, Outcome]:
    """The answer through failover.run on the fake clock; the caller takes `caller_s` over each chunk."""
    sts = {t.config.name: TargetState(t, CircuitBreaker(1, 10.0, clock=clock), LatencyStats(), 4) for t in targets}
    outcome = Outcome()

    async def main() -> str:
        text = ""
        async for chunk in failover.run(sts, list(sts), "chat", {}, Limits(60, 30, 30), outcome, clock):
            text += chunk.text
            clock.t += caller_s
        return text

    return asyncio.run(main()), outcome


def test_model_time_runs_from_the_request_to_the_targets_last_chunk():
    clock = Clock()
    assert Outcome().model_s == 0.0
    text, outcome = timed_answer(clock, TimedTarget("a", clock, ("Hello", " there."), first_s=0.3, each_s=0.2))
    assert text == "Hello there." and outcome.model_s == pytest.approx(0.5) and outcome.ttft_s == pytest.approx(0.3)


def test_model_time_sums_every_attempt_of_a_failover():
    clock = Clock()
    refused = TimedTarget("a", clock, ("x",), first_s=0.0, fail_after=0, fail_s=0.4)  # fails after 0.4 s
    cut = TimedTarget("b", clock, ("Hello", " there", " again."), first_s=0.1, each_s=0.1, fail_after=2, fail_s=0.5)
    backup = TimedTarget("c", clock, ("Hello there", " again."), first_s=0.25, each_s=0.05)
    text, outcome = timed_answer(clock, refused, cut, backup)
    assert text == "Hello there again." and [f["target"] for f in outcome.failovers] == ["a", "b"]
    assert outcome.model_s == pytest.approx(0.4 + (0.1 + 0.1 + 0.5) + (0.25 + 0.05))


def test_the_callers_time_past_the_last_chunk_is_not_model_time():
    clock = Clock()
    start = clock.t
    _, outcome = timed_answer(clock, TimedTarget("a", clock, ("Hi", "!"), first_s=0.3, each_s=0.1), caller_s=1.0)
    # 3 chunks (2 words, the finish): the caller's second over the last one is Keel's, not the model's.
    assert clock.t - start == pytest.approx(3.4) and outcome.model_s == pytest.approx(2.4)
