"""Who is asking: the tenant of the request's bearer key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from keel.errors import AuthenticationError, MissingAPIKeyError
from keel.keys import public_id
from keel.policy import Tenant, hash_api_key
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
        return self._tenant_of(_bearer(headers))

    def caller(self, headers: Mapping[str, str]) -> tuple[Tenant, str]:
        """The key's tenant and the key's public id (keel.keys.public_id, as `keel keys list` shows it); 401s
        as `tenant`."""
        key = _bearer(headers)
        return self._tenant_of(key), public_id(hash_api_key(key))

    def _tenant_of(self, key: str) -> Tenant:
        tenant = self.tenants.get(self.keys.tenant(key) or "")
        if tenant is None:
            raise AuthenticationError("invalid or revoked API key")
        return tenant


def _bearer(headers: Mapping[str, str]) -> str:
    header = headers.get("authorization", "")
    if not header.lower().startswith("bearer ") or not header[7:].strip():
        raise MissingAPIKeyError("missing API key: send 'Authorization: Bearer <key>' (keel keys create)")
    return header[7:].strip()
