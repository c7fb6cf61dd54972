"""Keel's own secret keys: the audit trail's signing key and the privacy hash key.

`keel up` generates each on first start (32 random bytes, in a 0600 file under <state_dir>/keys/),
so no install signs with a constant anyone can read in the source. A key is known by its id, a
fingerprint of the key itself, so an id can never name the wrong key: each digest names the id of
the key that signed it, and verification looks keys up by id among the active and retired ones.
`keel secrets rotate audit` makes a new active key and keeps the old one, retired, for verification.

The environment (KEEL_AUDIT__HMAC_KEY, KEEL_PRIVACY__HASH_KEY, or a file in KEEL_SECRETS_DIR)
overrides the files: on a cluster the state folder is not shared, so every node must get the same
keys from a secret store. Nothing generates keys on the fly in a job or a replica: a missing key
fails closed rather than leave two nodes with different keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

Purpose = Literal["audit", "hash"]
PURPOSES: tuple[Purpose, ...] = ("audit", "hash")
# The constant that signed trails before keys were generated per install: still verified (an old
# trail stays checkable), always reported as such, never used to sign.
DEV_AUDIT_KEY = b"keel-dev-only-audit-key"


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key (not enough to guess it: 60 bits of a keyed-prefix SHA-256)."""
    return "k" + hashlib.sha256(b"keel-key-id\0" + key).hexdigest()[:15]


DEV_AUDIT_KEY_ID = key_id(DEV_AUDIT_KEY)


@dataclass(frozen=True)
class KeySet:
    """The key that signs now and every key verification accepts (the active one included), by id."""

    active_id: str
    keys: Mapping[str, bytes]

    @property
    def active(self) -> bytes:
        return self.keys[self.active_id]

    @classmethod
    def of(cls, active: bytes, retired: Iterable[bytes] = ()) -> KeySet:
        keys = {key_id(k): k for k in retired}
        keys[key_id(active)] = active
        return cls(key_id(active), keys)

    def verifying(self) -> dict[str, bytes]:
        """The keys verification tries: these, and the development constant so old trails stay checkable."""
        return {DEV_AUDIT_KEY_ID: DEV_AUDIT_KEY, **self.keys}


def path(state: Path, purpose: Purpose) -> Path:
    return Path(state) / "keys" / f"{purpose}.json"


def load(state: Path, purpose: Purpose) -> KeySet | None:
    """The install's keys for `purpose`, or None before the first `keel up`."""
    try:
        doc = json.loads(path(state, purpose).read_text())
    except FileNotFoundError:
        return None
    keys = {k: v["key"].encode() for k, v in doc["keys"].items()}
    return KeySet(doc["active"], keys)


def ensure(state: Path, purpose: Purpose) -> tuple[KeySet, bool]:
    """The install's keys, generated if there are none yet; True when this call generated them.
    Two processes racing here end with one key: the file is linked into place only if absent."""
    if found := load(state, purpose):
        return found, False
    key = secrets.token_hex(32).encode()
    try:
        _write(state, purpose, {key_id(key): key}, key_id(key), exclusive=True)
    except FileExistsError:
        return ensure(state, purpose)  # another process wrote them first: read theirs
    return KeySet.of(key), True


def rotate(state: Path, purpose: Purpose) -> tuple[KeySet, str | None]:
    """A new active key; the old one stays, retired, so what it signed still verifies. Returns the
    keys and the retired key's id (None if there was no key before)."""
    old = load(state, purpose)
    key = secrets.token_hex(32).encode()
    keys = {**(old.keys if old else {}), key_id(key): key}
    _write(state, purpose, keys, key_id(key), exclusive=False)
    return KeySet(key_id(key), keys), old.active_id if old else None


def _write(state: Path, purpose: Purpose, keys: Mapping[str, bytes], active: str, *, exclusive: bool) -> None:
    target = path(state, purpose)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    old = json.loads(target.read_text())["keys"] if target.exists() else {}
    doc = {"active": active,
           "keys": {k: {"key": v.decode(), "created": old.get(k, {}).get("created", now)} for k, v in keys.items()}}
    tmp = target.with_name(f".{purpose}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            os.link(tmp, target)  # fails if another process got there first
        else:
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
