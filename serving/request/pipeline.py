"""Stages run in order over one context, each timed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from serving.request.context import RequestContext


class Stage(Protocol):
    name: str  # its key in ctx.timings (and, later, its trace span)

    async def __call__(self, ctx: RequestContext) -> None: ...


async def run(stages: Sequence[Stage], ctx: RequestContext) -> None:
    """Each stage in turn; one that raises ends the request. Every stage's duration goes into
    ctx.timings, the one that ended it included."""
    clock = time.perf_counter
    start = clock()
    for stage in stages:
        try:
            await stage(ctx)
        finally:
            end = clock()
            ctx.timings[stage.name] = end - start
            start = end
