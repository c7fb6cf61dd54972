"""Who is asking: the tenant of the request's bearer key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from keel.errors import AuthenticationError, MissingAPIKeyError
from keel.policy import Tenant
from serving.request.context import RequestContext


class KeyLookup(Protocol):
    def tenant(self, api_key: str) -> str | None: ...  # keel.keys.KeyRing: None for unknown or revoked


class Authenticate:
    name = "authenticate"

    def __init__(self, keys: KeyLookup, tenants: Mapping[str, Tenant]) -> None:
        self.keys, self.tenants = keys, tenants

    async def __call__(self, ctx: RequestContext) -> None:
        ctx.tenant = self.tenant(ctx.http.headers)

    def tenant(self, headers: Mapping[str, str]) -> Tenant:
        """The key's tenant; 401 for a missing key, or one unknown, revoked or of a tenant no longer in the policy."""
        header = headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise MissingAPIKeyError("missing API key: send 'Authorization: Bearer <key>' (keel keys create)")
        tenant = self.tenants.get(self.keys.tenant(header[7:].strip()) or "")
        if tenant is None:
            raise AuthenticationError("invalid or revoked API key")
        return tenant
