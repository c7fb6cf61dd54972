"""The PII guard before any target: the body pseudonymized (one vault per request) when the policy
says so for the targets that may answer it, else passed as sent; either way the answer is checked on
its way back (check). A guard that fails fails closed: 500, and nothing is sent to any model. Content
it cannot read (images, audio, files) is refused where pseudonymization is required: a photo of an ID
card would otherwise reach the model as it is."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from keel.errors import GuardFailedError, UnguardedContentError
from keel.guard import AnswerGuard, Guard
from keel.policy import Policy
from serving.api import PART_TYPES, ChatRequest
from serving.request.context import RequestContext, required

logger = logging.getLogger("keel.gateway")


class Protect:
    name = "protect"

    def __init__(self, guard: Guard | None, policy: Policy, kinds: Mapping[str, str]) -> None:
        self.guard, self.policy, self.kinds = guard, policy, kinds  # kinds: target name -> its kind

    async def __call__(self, ctx: RequestContext) -> None:
        if self.guard is None:
            return
        body = required(ctx.body)
        kinds = [self.kinds[name] for name in required(ctx.route).ranked]
        if self.policy.pseudonymizes(data_class := required(ctx.data_class), kinds):
            rule = self.policy.data_classes[data_class]
            req = required(ctx.request)
            unread = sorted(PART_TYPES[f] for f in req.part_features()) if isinstance(req, ChatRequest) else []
            if rule.unreadable_parts == "refuse" and unread:
                raise UnguardedContentError(
                    f"{', '.join(unread)} content parts cannot be pseudonymized, and data class {data_class.value!r} "
                    f"is pseudonymized for the targets that may answer this request, so they are refused "
                    f"(data_classes.{data_class.value}.unreadable_parts)", param="messages")
            try:
                protected = await asyncio.to_thread(self.guard.protect, body, ctx.passages,
                                                    self.policy.kept_entities(data_class))
            except Exception:  # fail closed: nothing unprotected goes out
                logger.exception("the PII guard failed on request %s", ctx.rid)
                raise GuardFailedError("the PII guard could not process this request; it was not sent to any "
                                       "model") from None
            ctx.actions.pseudonymized, ctx.actions.entities = True, protected.entities
        else:
            protected = self.guard.unprotected(body)
        ctx.body = protected.body
        ctx.answer_guard = AnswerGuard(self.guard, protected, ctx.actions)
