"""POST /v1/feedback: a caller rates one of its own answers, by its request id (the response's `id`,
the x-request-id header). The rating goes to the feedback store of the zone the answer's data went to
(keel.feedback.store), the comment and correction scrubbed first (user text at rest: PII becomes
[PERSON]); the audit trail records that feedback arrived, never its words. Another tenant's request is
a 404 like one that never was, so ids do not leak. Posting again from the same key updates the
feedback (200) instead of adding some (201)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from keel.audit import Trails
from keel.errors import GuardFailedError, InvalidParameterError, KeelError, NotFoundError
from keel.feedback.store import Feedback, Link, Stores, ZoneStore
from serving import api
from serving.api import FeedbackRequest
from serving.metrics import Metrics
from serving.request.authenticate import Authenticate


class FeedbackDesk:
    def __init__(self, authenticate: Authenticate, stores: Stores, trails: Trails, metrics: Metrics,
                 scrub: Callable[[Sequence[str]], list[str]] | None, max_chars: int, window_s: float) -> None:
        self.authenticate, self.stores, self.trails, self.metrics = authenticate, stores, trails, metrics
        self.scrub, self.max_chars, self.window_s = scrub, max_chars, window_s
        self.max_body = 8 * max_chars + 4096  # two texts of max_chars, 4 bytes a character at worst, and the rest

    async def __call__(self, request: Request) -> Response:
        try:
            caller, key_id = self.authenticate.caller(request.headers)
            tenant = caller.name
            raw = await request.body()
            if len(raw) > self.max_body:
                raise InvalidParameterError(f"request body is {len(raw)} bytes, above this endpoint's "
                                            f"{self.max_body}")
            ask = api.parse(raw, FeedbackRequest)
            found = await asyncio.to_thread(self._find, ask.request_id, tenant)
            if found is None:
                raise NotFoundError("no answer of yours with this request_id takes feedback (unknown, refused "
                                    "before any model answered, or older than feedback.window_days)",
                                    param="request_id")
            store, link = found
            comment, correction = await asyncio.to_thread(self._words, ask)
            now = time.time()
            fb = Feedback(ask.request_id, tenant, key_id, ask.value, ask.rating, comment, correction, now, now)
            stored, created = await asyncio.to_thread(store.put, fb, link)
        except KeelError as e:
            return api.error_response(e)
        self.trails.submit(store.zone, "feedback", request_id=ask.request_id, tenant=tenant, key_id=stored.key_id,
                           rating=ask.rating, score=ask.value, comment=comment is not None,
                           correction=correction is not None, updated=not created)
        self.metrics.feedback_received(ask.rating or "score")
        return JSONResponse(_body(stored, link), status_code=201 if created else 200)

    def _find(self, request_id: str, tenant: str) -> tuple[ZoneStore, Link] | None:
        found = self.stores.find_recent(request_id, tenant)  # an answer given just now, by any replica
        if found is None or found[1].created_at < time.time() - self.window_s:
            return None
        return found

    def _words(self, ask: FeedbackRequest) -> tuple[str | None, str | None]:
        """The comment and the correction as stored (None: not sent): each within max_chars, both scrubbed in
        one call."""
        sent = {name: text for name, text in (("comment", ask.comment), ("correction", ask.correction)) if text}
        for name, text in sent.items():
            if len(text) > self.max_chars:
                raise InvalidParameterError(f"{name} is {len(text)} characters, above feedback.max_comment_chars "
                                            f"({self.max_chars})", param=name)
        if not sent:
            return None, None
        if self.scrub is None:  # fail closed: user text is never stored unscrubbed
            raise GuardFailedError("comments and corrections need the PII guard, which is off here "
                                   "(guard.enabled); send the rating alone")
        scrubbed = dict(zip(sent, self.scrub(list(sent.values())), strict=True))
        return scrubbed.get("comment"), scrubbed.get("correction")


def _body(fb: Feedback, link: Link) -> dict[str, Any]:
    """The feedback as stored: the caller sees what was kept of its words."""
    return {"object": "feedback", "request_id": fb.request_id, "rating": fb.rating, "score": fb.score,
            "comment": fb.comment, "correction": fb.correction, "created_at": int(fb.created_at),
            "updated_at": int(fb.updated_at),
            "prompt": {"name": link.prompt, "version": link.prompt_version} if link.prompt else None}
