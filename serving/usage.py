"""GET /v1/usage: the caller's own tenant's usage and cost, in time buckets by the model that answered.

Shaped like OpenAI's usage API (`/v1/organization/usage/completions`: a page of buckets, each with its
results) with the cost of each result as its `amount`. The numbers come from every zone's feedback store
(each answer's link carries its tokens and cost: keel.feedback.store), so every replica answers the same,
and they reach back `feedback.window_days`, as long as the links are kept. Per-tenant numbers live here,
behind the tenant's key, never in the unauthenticated metrics.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from keel.errors import InvalidParameterError, KeelError
from keel.feedback.store import Stores
from serving import api
from serving.request.authenticate import Authenticate

# Bucket widths and the most buckets a page holds, as OpenAI's usage API allows them.
WIDTHS = {"1m": (60, 1440), "1h": (3600, 168), "1d": (86400, 31)}


class UsageDesk:
    def __init__(self, authenticate: Authenticate, stores: Stores, kept_days: float) -> None:
        self.authenticate, self.stores, self.kept_days = authenticate, stores, kept_days

    async def __call__(self, request: Request) -> Response:
        try:
            tenant = self.authenticate.tenant(request.headers).name
            start, end, width = self._window(request.query_params)
            rows = await asyncio.to_thread(self.stores.usage, tenant, start, end, width)
        except KeelError as e:
            return api.error_response(e)
        return JSONResponse(page(rows, start, end, width) | {"keel": {"tenant": tenant,
                                                                      "kept_days": self.kept_days}})

    def _window(self, q: Any) -> tuple[int, int, int]:
        width_name = q.get("bucket_width", "1d")
        if width_name not in WIDTHS:
            raise InvalidParameterError(f"bucket_width must be one of {', '.join(WIDTHS)}", param="bucket_width")
        width, most = WIDTHS[width_name]
        now = int(time.time())
        end = _int(q, "end_time", now)
        start = _int(q, "start_time", end - (most - 1) * width)  # aligned below: `most` buckets at most
        if start >= end:
            raise InvalidParameterError("start_time must be before end_time", param="start_time")
        start -= start % width  # buckets begin on the width's boundaries, as the store groups them
        if (end - start) / width > most:
            raise InvalidParameterError(f"at most {most} buckets of {width_name} per page: narrow start_time and "
                                        "end_time", param="start_time")
        return start, end, width


def _int(q: Any, name: str, default: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParameterError(f"{name} must be a Unix time in seconds", param=name) from None
    if value < 0:
        raise InvalidParameterError(f"{name} must be a Unix time in seconds", param=name)
    return value


def page(rows: list[dict[str, Any]], start: int, end: int, width: int) -> dict[str, Any]:
    """Every bucket of the window, empty ones included (as OpenAI's), each with one result per model."""
    results: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        results.setdefault(int(r["start_time"]), []).append({
            "object": "organization.usage.completions.result", "model": r["target"],
            "input_tokens": r["prompt_tokens"], "output_tokens": r["completion_tokens"],
            "num_model_requests": r["requests"], "amount": {"value": round(r["cost"], 8), "currency": "usd"}})
    buckets = [{"object": "bucket", "start_time": t, "end_time": min(t + width, end), "results": results.get(t, [])}
               for t in range(start, end, width)]
    return {"object": "page", "data": buckets, "has_more": False, "next_page": None}
