"""Gateway API keys: created and revoked with `keel keys`, stored only as SHA-256 hashes.

Keys belong to tenants of the policy. Two places hold their hashes: `policy.tenants[].api_key_hashes`
in keel.yaml (for keys managed as configuration) and `<state_dir>/api_keys.json`, which the CLI
writes (created, listed, revoked without editing YAML). The gateway reads both and notices a
change of the file within a second, without a restart.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from keel.errors import NotFoundError
from keel.policy import hash_api_key, new_api_key
from keel.settings import KeelSettings


def public_id(digest: str) -> str:
    """A key's short public id, for listing, revoking and crediting feedback: the first hex digits of its
    hash (hash_api_key's "sha256:<hex>")."""
    return digest.removeprefix("sha256:")[:12]


@dataclass
class KeyRecord:
    id: str  # public_id(hash)
    tenant: str
    hash: str
    name: str
    created: str
    revoked: str | None = None


def key_file(settings: KeelSettings) -> Path:
    return settings.state / "api_keys.json"


class KeyStore:
    def __init__(self, settings: KeelSettings) -> None:
        self.settings = settings
        self.path = key_file(settings)

    def records(self) -> list[KeyRecord]:
        try:
            return [KeyRecord(**r) for r in json.loads(self.path.read_text())["keys"]]
        except FileNotFoundError:
            return []

    def active(self) -> dict[str, str]:
        """Hash -> tenant of every key the gateway accepts: keel.yaml's and the file's unrevoked ones."""
        static = {h: t.name for t in self.settings.policy.tenants for h in t.api_key_hashes}
        return static | {r.hash: r.tenant for r in self.records() if r.revoked is None}

    def create(self, tenant: str, name: str = "") -> tuple[str, KeyRecord]:
        """A new key for a tenant of the policy; the key itself is returned once and never stored."""
        if tenant not in {t.name for t in self.settings.policy.tenants}:
            raise NotFoundError(f"unknown tenant {tenant!r}; tenants are declared in policy.tenants", param="tenant")
        key = new_api_key()
        digest = hash_api_key(key)
        rec = KeyRecord(public_id(digest), tenant, digest, name,
                        dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        self._write([*self.records(), rec])
        return key, rec

    def revoke(self, key_id: str) -> KeyRecord:
        recs = self.records()
        for r in recs:
            if r.id == key_id and r.revoked is None:
                r.revoked = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                self._write(recs)
                return r
        raise NotFoundError(f"no active key with id {key_id!r}", param="key_id")

    def _write(self, recs: list[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"keys": [asdict(r) for r in recs]}, indent=2) + "\n")
        tmp.chmod(0o600)
        os.replace(tmp, self.path)


class KeyRing:
    """Key -> tenant lookups for the gateway; the file is re-read when it changes.

    Looking up the key's SHA-256 in a dict is safe against timing attacks: a timing difference
    could only reveal bits of a hash, which says nothing usable about the key behind it.
    """

    def __init__(self, settings: KeelSettings, recheck_s: float = 1.0) -> None:
        self.store = KeyStore(settings)
        self.recheck_s = recheck_s
        self._hashes: dict[str, str] = {}
        self._mtime: float | None = -1.0  # never an mtime: the first lookup reads the file (or its absence)
        self._checked = 0.0

    def tenant(self, api_key: str) -> str | None:
        digest = hash_api_key(api_key)
        self._refresh()
        if digest not in self._hashes:
            self._refresh(force=True)  # a key created a moment ago works at once; a stat costs microseconds
        return self._hashes.get(digest)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.recheck_s:
            return
        self._checked = now
        try:
            mtime = self.store.path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self._mtime = mtime
            self._hashes = self.store.active()
