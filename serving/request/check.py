"""The answer on its way back through the guard (keel.guard.AnswerGuard): new identifiers the model
wrote redacted, toxicity flagged or blocked, the caller's own values restored in place of the
placeholders, piece by piece as it streams. Without the guard, the answer passes as it came."""

from __future__ import annotations

from serving.request.context import RequestContext, required


class Check:
    name = "check"

    async def __call__(self, ctx: RequestContext) -> None:
        if ctx.answer_guard is not None:
            ctx.rest = ctx.answer_guard.stream(required(ctx.first), required(ctx.rest))
            ctx.first = None  # the guarded stream begins with it
