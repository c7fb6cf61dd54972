"""The PII guard before any target: the body pseudonymized (one vault per request) when the policy
says so for the targets that may answer it, else passed as sent; either way the answer is checked on
its way back (check). A guard that fails fails closed: 500, and nothing is sent to any model. Content
it cannot read (images, audio, files) is refused where pseudonymization is required: a photo of an ID
card would otherwise reach the model as it is."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from keel.errors import GuardFailedError, UnguardedContentError
from keel.guard import AnswerGuard, Guard
from keel.policy import Policy
from serving.api import PART_FEATURES
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
            if rule.unreadable_parts == "refuse" and (unread := unreadable_parts(body)):
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


def unreadable_parts(body: Mapping[str, Any]) -> list[str]:
    """The types of the content parts in `body`'s messages that the guard cannot read (not text)."""
    found = {p.get("type") for m in body.get("messages") or () if isinstance(m.get("content"), list)
             for p in m["content"] if PART_FEATURES.get(p.get("type")) is not None}
    return sorted(str(t) for t in found)
