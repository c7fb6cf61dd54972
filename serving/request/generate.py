"""The answer's stream through the ranked targets (serving.failover), taken up to its first chunk, so
that a failure before any token is still a proper HTTP error; the rest flows to the caller (reply).
Generation counts against this replica's admission bound until `release`."""

from __future__ import annotations

from collections.abc import Mapping

from keel.errors import AllTargetsFailedError, KeelError, OverloadedError, TargetRejectedError
from serving import failover
from serving.failover import Limits, NoTargetLeftError, Outcome, TargetState, retry_after
from serving.request.admit import Admission
from serving.request.context import RequestContext, required
from serving.targets.base import TargetError


class Generate:
    name = "generate"

    def __init__(self, states: Mapping[str, TargetState], limits: Limits, admission: Admission,
                 retry_after_s: int) -> None:
        self.states, self.limits, self.admission, self.retry_after_s = states, limits, admission, retry_after_s

    async def __call__(self, ctx: RequestContext) -> None:
        ctx.outcome = Outcome(kept=[] if ctx.retain else None)
        self.admission.in_flight += 1
        ctx.stream = failover.run(self.states, required(ctx.route).ranked, ctx.kind, required(ctx.body), self.limits,
                                  ctx.outcome)
        try:
            ctx.first = await anext(ctx.stream)
        except (NoTargetLeftError, TargetError) as e:
            await self.release(ctx)
            raise self.failure(e, ctx) from None
        except BaseException:
            await self.release(ctx)
            raise
        ctx.rest = ctx.stream

    async def release(self, ctx: RequestContext) -> None:
        """Once the answer is over (done, failed, or its caller gone): this replica's slot and the target's."""
        if (stream := ctx.stream) is not None:
            ctx.stream = None
            self.admission.in_flight -= 1
            await stream.aclose()

    def failure(self, e: NoTargetLeftError | TargetError, ctx: RequestContext) -> KeelError:
        """The caller's error for a stream that failed, before its first chunk or after."""
        if isinstance(e, TargetError):  # a client error the target reported: the request's fault
            err = (e.body or {}).get("error") or {}
            return TargetRejectedError(str(err.get("message") or e), status=e.status or 400,
                                       target_code=err.get("code"), param=err.get("param"))
        if e.busy:
            return OverloadedError("every model target is at capacity; retry shortly", retry_after=self.retry_after_s)
        tried = "; ".join(f"{f['target']}: {f['error']}" for f in e.outcome.failovers)
        wait = retry_after(self.states.values(), self.retry_after_s)
        return AllTargetsFailedError(f"no model target in zones {ctx.zones} could answer ({tried}); Keel never sends "
                                     "this request to another zone", retry_after=wait)
