"""The request's data class (the key's default, or a stricter one asked in x-keel-data-class) and the
zones its data may go to (narrowed by x-keel-zone): 400 for a bad header, 403 past the tenant's rights."""

from __future__ import annotations

from keel.errors import InvalidDataClassError
from keel.policy import DataClass, Policy, resolve_class
from serving.request.context import RequestContext, required


class Scope:
    name = "scope"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    async def __call__(self, ctx: RequestContext) -> None:
        tenant, headers = required(ctx.tenant), ctx.http.headers
        asked = headers.get("x-keel-data-class")
        try:
            requested = DataClass(asked.strip().lower()) if asked else None
        except ValueError:
            raise InvalidDataClassError(f"x-keel-data-class {asked!r} is not a data class; use one of "
                                        f"{[c.value for c in DataClass]}", param="x-keel-data-class") from None
        ctx.data_class = resolve_class(tenant, requested)  # DataClassNotAllowedError: 403
        ctx.zones = self.policy.request_zones(tenant, ctx.data_class, headers.get("x-keel-zone") or None)  # 403
        ctx.retain = ctx.endpoint != "embeddings" and self.policy.retains(tenant, ctx.data_class)
