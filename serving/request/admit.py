"""Admission: this replica's bound on answers in progress (past it, 429 at once, never a queue), then
the tenant's rate limit, charged on the estimate (prompt plus max_tokens) and settled by record."""

from __future__ import annotations

import math
from dataclasses import dataclass

from keel.errors import OverloadedError, RateLimitError
from keel.ratelimit import RateLimiter
from keel.routing import estimate_tokens
from serving.request.context import RequestContext, required


@dataclass
class Admission:
    """This replica's answers in progress: generate counts them in and out."""

    limit: int
    retry_after_s: int
    in_flight: int = 0


class Admit:
    name = "admit"

    def __init__(self, admission: Admission, limiter: RateLimiter) -> None:
        self.admission, self.limiter = admission, limiter

    async def __call__(self, ctx: RequestContext) -> None:
        if self.admission.in_flight >= self.admission.limit:
            raise OverloadedError("the gateway is at capacity; retry shortly", retry_after=self.admission.retry_after_s)
        tenant = required(ctx.tenant)
        tokens = estimate_tokens(ctx.prompt_text) + ctx.max_tokens
        wait = self.limiter.admit(tenant.name, tenant.requests_per_minute, tenant.tokens_per_minute, tokens)
        ctx.headers.update(self.limiter.headers(tenant.name, tenant.requests_per_minute, tenant.tokens_per_minute))
        if wait is not None:
            raise RateLimitError(f"tenant {tenant.name!r} is over its rate limit ({tenant.requests_per_minute or '-'} "
                                 f"requests, {tenant.tokens_per_minute or '-'} tokens per minute); retry after "
                                 f"{math.ceil(wait)} s", retry_after=max(1, math.ceil(wait)))
        ctx.charged = tokens
