"""The failover path's own timing rules, without a server: the per-chunk time limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serving.failover import _Deadline


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
